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
