/* corral-enter: run a command inside a live sandbox in one exec.
 *
 * What the portable chain `sh (cgroups) -> nsenter -> setpriv -> env -i -> prlimit -> shell`
 * does, in one small process: join the sandbox's cgroups, enter every namespace of its init
 * (as nsenter does: others first, the user namespace last when we are host root), take its
 * root and working directory, become its uid 0 (or keep our credentials when we own the
 * namespace), fork into its pid namespace, drop every capability for good (no_new_privs,
 * bounding, inheritable and ambient sets), set the resource limits, optionally lead a new
 * session, and exec the command with exactly the environment given (nothing inherited).
 *
 * The parent stays outside the pid namespace, waits, and exits as the child did, so the
 * server sees one process whose group holds the command.
 *
 * usage: corral-enter -t PID -w CWD [-n] [-o] [-s] [-g CGROUP_PROCS]... [-l NAME=VALUE]...
 *                     [-e KEY=VALUE]... -- PROGRAM [ARG]...
 *   -n  also join the network namespace      -o  keep credentials (we own the namespace)
 *   -s  setsid() before exec (a background process: its own group)
 *   -l  as|nproc|fsize|cpu=VALUE             -e  an environment variable of the command
 * Errors go to stderr as "corral-enter: ..." with exit status 1 (before the command runs).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/capability.h>

#define MAX_LIST 64

static void die(const char *what, const char *arg) {
    fprintf(stderr, "corral-enter: %s%s%s: %s\n", what, arg ? " " : "", arg ? arg : "", strerror(errno));
    exit(1);
}

static void usage(const char *why) {
    fprintf(stderr, "corral-enter: %s\n", why);
    exit(1);
}

struct ns { const char *name; int type; int fd; };

static void set_limit(const char *spec) {
    const char *eq = strchr(spec, '=');
    if (!eq) usage("bad limit");
    unsigned long long value = strtoull(eq + 1, NULL, 10);
    int resource;
    if (!strncmp(spec, "as=", 3)) resource = RLIMIT_AS;
    else if (!strncmp(spec, "nproc=", 6)) resource = RLIMIT_NPROC;
    else if (!strncmp(spec, "fsize=", 6)) resource = RLIMIT_FSIZE;
    else if (!strncmp(spec, "cpu=", 4)) resource = RLIMIT_CPU;
    else usage("unknown limit");
    struct rlimit rl = {value, value};
    if (setrlimit(resource, &rl) != 0) die("setrlimit", spec);
}

static void drop_capabilities(void) {
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("no_new_privs", NULL);
    for (int cap = 0; cap <= 63; cap++) {
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL) die("drop bounding capability", NULL);
    }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL) die("clear ambient", NULL);
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capget, &header, data) != 0) die("capget", NULL);
    /* The command runs as root of the namespace: execve gives it the bounding set (now empty);
     * clear the inheritable set too, as setpriv --inh-caps=-all does. */
    data[0].inheritable = data[1].inheritable = 0;
    if (syscall(SYS_capset, &header, data) != 0) die("capset", NULL);
}

int main(int argc, char **argv) {
    const char *pid = NULL, *cwd = NULL;
    int join_net = 0, keep_creds = 0, new_session = 0;
    const char *cgroups[MAX_LIST], *limits[MAX_LIST];
    char *env[MAX_LIST * 16 + 1];
    int ncg = 0, nlim = 0, nenv = 0, i;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--")) { i++; break; }
        if (!strcmp(a, "-n")) join_net = 1;
        else if (!strcmp(a, "-o")) keep_creds = 1;
        else if (!strcmp(a, "-s")) new_session = 1;
        else if (i + 1 >= argc) usage("an option lacks its value");
        else if (!strcmp(a, "-t")) pid = argv[++i];
        else if (!strcmp(a, "-w")) cwd = argv[++i];
        else if (!strcmp(a, "-g")) { if (ncg == MAX_LIST) usage("too many cgroups"); cgroups[ncg++] = argv[++i]; }
        else if (!strcmp(a, "-l")) { if (nlim == MAX_LIST) usage("too many limits"); limits[nlim++] = argv[++i]; }
        else if (!strcmp(a, "-e")) { if (nenv == MAX_LIST * 16) usage("too many variables"); env[nenv++] = argv[++i]; }
        else usage("unknown option");
    }
    env[nenv] = NULL;
    if (!pid || !cwd || i >= argc) usage("usage: corral-enter -t PID -w CWD [...] -- PROGRAM [ARG]...");
    char **command = argv + i;

    char me[32];
    snprintf(me, sizeof me, "%d", (int)getpid());
    for (int c = 0; c < ncg; c++) {  /* first: everything after (the command's children) is counted */
        int fd = open(cgroups[c], O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, me, strlen(me)) < 0) die("join cgroup", cgroups[c]);
        close(fd);
    }

    struct ns spaces[] = {
        {"user", CLONE_NEWUSER, -1}, {"cgroup", CLONE_NEWCGROUP, -1}, {"ipc", CLONE_NEWIPC, -1},
        {"uts", CLONE_NEWUTS, -1},   {"net", CLONE_NEWNET, -1},       {"pid", CLONE_NEWPID, -1},
        {"mnt", CLONE_NEWNS, -1},
    };
    int count = sizeof spaces / sizeof spaces[0];
    char path[64];
    for (int s = 0; s < count; s++) {
        if (spaces[s].type == CLONE_NEWNET && !join_net) continue;
        snprintf(path, sizeof path, "/proc/%s/ns/%s", pid, spaces[s].name);
        spaces[s].fd = open(path, O_RDONLY | O_CLOEXEC);
        if (spaces[s].fd < 0) die("open", path);
    }
    snprintf(path, sizeof path, "/proc/%s/root", pid);
    int root = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (root < 0) die("open", path);

    /* As nsenter: pass 0 enters all but the user namespace (host root may), pass 1 the user
     * namespace first, then what pass 0 could not (an owner without host privileges). */
    for (int pass = 0; pass < 2; pass++) {
        for (int s = 1 - pass; s < count; s++) {
            if (spaces[s].fd < 0) continue;
            if (setns(spaces[s].fd, spaces[s].type) != 0) {
                if (pass == 0 && errno == EPERM) continue;
                die("setns", spaces[s].name);
            }
            close(spaces[s].fd);
            spaces[s].fd = -1;
        }
    }
    if (fchdir(root) != 0 || chroot(".") != 0) die("enter the sandbox's root", NULL);
    close(root);
    if (chdir(cwd) != 0) die("cannot change directory to", cwd);
    if (!keep_creds) {
        if (setgroups(0, NULL) != 0 && errno != EPERM) die("setgroups", NULL);  /* bwrap denies it there */
        if (setresgid(0, 0, 0) != 0) die("setgid", NULL);
        if (setresuid(0, 0, 0) != 0) die("setuid", NULL);
    }

    pid_t child = fork();
    if (child < 0) die("fork", NULL);
    if (child == 0) {
        drop_capabilities();
        for (int l = 0; l < nlim; l++) set_limit(limits[l]);
        if (new_session && setsid() < 0) die("setsid", NULL);
        execve(command[0], command, env);
        die("exec", command[0]);
    }
    int status;
    while (waitpid(child, &status, 0) < 0) {
        if (errno != EINTR) die("wait", NULL);
    }
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) {  /* end the way it ended, so the server sees the signal */
        signal(WTERMSIG(status), SIG_DFL);
        kill(getpid(), WTERMSIG(status));
        return 128 + WTERMSIG(status);
    }
    return 1;
}
