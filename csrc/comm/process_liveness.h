// Is a peer process still there? kill(pid, 0) alone is not enough: a killed
// child stays a zombie until its parent reaps it (kill still succeeds), and a
// pid can be reused by an unrelated process. /proc/<pid>/stat tells both apart.
#pragma once

#include <cstdint>

namespace xllm::comm {

// The process's start time in clock ticks after boot (field 22 of
// /proc/<pid>/stat), or 0 where /proc cannot tell.
uint64_t process_start_time(int pid);

// False if the pid is gone, a zombie, or now names a process started at a
// different time than `start_time` (0: do not compare). A process owned by
// another user (kill gives EPERM) counts as alive.
bool process_alive(int pid, uint64_t start_time);

}  // namespace xllm::comm
