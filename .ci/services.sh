# Start the real parts the tests use. Sourced by .ci/run; safe to run twice.

start_dockerd() {
  if docker info >/dev/null 2>&1; then return; fi
  echo "starting dockerd"
  (dockerd >/tmp/corral-dockerd.log 2>&1 &)
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && return; sleep 0.5; done
  echo "dockerd did not start:"; tail -20 /tmp/corral-dockerd.log; return 1
}

start_postgres() {
  local version
  version=$(ls /usr/lib/postgresql | sort -V | tail -1)
  if ! pg_lsclusters -h 2>/dev/null | grep -q online; then
    pg_lsclusters -h | grep -q "^$version main" || pg_createcluster "$version" main >/dev/null
    pg_ctlcluster "$version" main start
  fi
  su postgres -c "psql -qtc \"SELECT 1 FROM pg_roles WHERE rolname='corral'\"" | grep -q 1 \
    || su postgres -c "psql -qc \"CREATE ROLE corral LOGIN SUPERUSER PASSWORD 'corral'\""
  su postgres -c "psql -qtc \"SELECT 1 FROM pg_database WHERE datname='corral_test'\"" | grep -q 1 \
    || su postgres -c "createdb -O corral corral_test"
  export CORRAL_TEST_POSTGRES_URL="postgresql://corral:corral@127.0.0.1:5432/corral_test"
}

# The sandbox tests' docker image (nothing can be pulled): busybox-static from the host,
# imported as a one-layer image. Safe to run twice.
build_test_image() {
  local image=corral-sandbox-test:latest root
  if docker image inspect "$image" >/dev/null 2>&1; then return; fi
  root=$(mktemp -d)
  mkdir -p "$root"/{bin,tmp,etc,root,workspace,proc,sys,dev}
  cp /bin/busybox "$root/bin/busybox"
  for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
  printf 'root:x:0:\n' >"$root/etc/group"
  chmod 1777 "$root/tmp"
  tar -C "$root" -c . | docker import -c 'ENV PATH=/bin' - "$image" >/dev/null
  rm -rf "$root"
}
