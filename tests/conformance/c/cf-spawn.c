/* Client of the spawn scenarios (tests/conformance/scenarios/posix_spawn.py,
 * vfork_exec.py): with a connection open, start /bin/true the way MODE says,
 * then go on using the connection. Reports OBS lines as runtime.py does.
 *
 *     cf-spawn posix_spawn|vfork PORT
 */
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static void obs_str(const char *key, const char *val)
{
	printf("OBS [\"%s\", \"%s\"]\n", key, val);
	fflush(stdout);
}

static void obs_int(const char *key, long val)
{
	printf("OBS [\"%s\", %ld]\n", key, val);
	fflush(stdout);
}

/* An errno as runtime.err_name() names it. */
static void obs_err(const char *key, int err)
{
	const char *name = strerrorname_np(err);

	obs_str(key, name ? name : "?");
}

/* Read exactly n bytes (n < 64): the text, or the error name, or what came before EOF. */
static void obs_recv(const char *key, int fd, size_t n)
{
	char buf[64] = "";
	size_t got = 0;

	while (got < n) {
		ssize_t k = recv(fd, buf + got, n - got, 0);

		if (k < 0) {
			obs_err(key, errno);
			return;
		}
		if (k == 0)
			break;
		got += k;
	}
	buf[got] = 0;
	obs_str(key, buf);
}

static void obs_send(const char *key, int fd, const char *s)
{
	ssize_t k = send(fd, s, strlen(s), 0);

	if (k < 0)
		obs_err(key, errno);
	else
		obs_int(key, k);
}

static int spawn_true(const char *mode)
{
	char *argv[] = {"true", NULL};
	pid_t pid;
	int status;

	if (!strncmp(mode, "posix_spawn", 11)) {
		posix_spawn_file_actions_t fa;
		int err;

		posix_spawn_file_actions_init(&fa);
		if (!strcmp(mode, "posix_spawn_closefrom"))
			posix_spawn_file_actions_addclosefrom_np(&fa, 3);
		err = posix_spawn(&pid, "/bin/true", &fa, NULL, argv, environ);
		posix_spawn_file_actions_destroy(&fa);
		if (err)
			return -err;
	} else {
		int closefrom = !strcmp(mode, "vfork_closefrom");

		pid = vfork();
		if (pid == 0) {
			if (closefrom)
				close_range(3, ~0U, 0);
			execve("/bin/true", argv, environ);
			_exit(127);
		}
		if (pid < 0)
			return -errno;
	}
	if (waitpid(pid, &status, 0) < 0)
		return -errno;
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* As runtime.settle(): under the shm tier, wait (briefly) until the
 * connection uses its rings (the test build of the interposer has the
 * hook; elsewhere there is nothing to wait for). */
static void settle(int fd)
{
	int (*fd_settle)(int, int) = (int (*)(int, int))dlsym(RTLD_DEFAULT, "shmbypass_fd_settle");

	if (fd_settle)
		fd_settle(fd, 500);
}

int main(int argc, char **argv)
{
	struct sockaddr_in sa = {.sin_family = AF_INET};
	int fd;

	if (argc != 3) {
		fprintf(stderr, "usage: cf-spawn posix_spawn[_closefrom]|vfork[_closefrom] PORT\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);            /* as in the Python programs */
	sa.sin_port = htons(atoi(argv[2]));
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		perror("connect");
		return 1;
	}
	settle(fd);
	obs_send("send before", fd, "before");
	obs_recv("reply 1", fd, 1);
	obs_int("child", spawn_true(argv[1]));
	obs_send("send", fd, "after");
	obs_recv("reply 2", fd, 1);
	close(fd);
	return 0;
}
