#include "comm/process_liveness.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace xllm::comm {
namespace {

// Reads the state letter and start time from /proc/<pid>/stat; false if unreadable.
bool read_proc_stat(int pid, char* state, uint64_t* start_time) {
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buf[1024];
  const ssize_t n = ::read(fd, buf, sizeof(buf) - 1);
  ::close(fd);
  if (n <= 0) return false;
  buf[n] = '\0';
  // Field 2 is the command name in parentheses and may hold spaces or ')'; the
  // last ')' ends it. Then come " <state> <ppid> ..." (fields 3, 4, ...).
  const char* p = std::strrchr(buf, ')');
  if (p == nullptr || p[1] != ' ' || p[2] == '\0') return false;
  p += 2;
  *state = *p;
  int field = 3;
  while (field < 22 && *p != '\0') {
    if (*p == ' ') ++field;
    ++p;
  }
  if (field != 22) return false;
  *start_time = std::strtoull(p, nullptr, 10);
  return true;
}

}  // namespace

uint64_t process_start_time(int pid) {
  char state = 0;
  uint64_t start = 0;
  return read_proc_stat(pid, &state, &start) ? start : 0;
}

bool process_alive(int pid, uint64_t start_time) {
  if (pid <= 0) return false;
  if (::kill(pid, 0) != 0 && errno == ESRCH) return false;
  char state = 0;
  uint64_t start = 0;
  if (read_proc_stat(pid, &state, &start)) {
    if (state == 'Z' || state == 'X' || state == 'x') return false;
    if (start_time != 0 && start != start_time) return false;
  }
  return true;
}

}  // namespace xllm::comm
