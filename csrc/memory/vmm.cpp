#include "memory/vmm.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <cerrno>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>

namespace xllm {
namespace {

constexpr int64_t kHugePageBytes = int64_t{2} << 20;

template <class... Parts>
[[noreturn]] void invalid(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

// map_hint: the call added mappings, so ENOMEM may mean too many of them.
[[noreturn]] void throw_errno(int err, const std::string& what, bool map_hint = false) {
  std::string message = what;
  if (err == ENOMEM && map_hint) {
    // The usual cause is not memory: each mapped run and each gap is one VMA.
    message += " (out of memory, or the process hit vm.max_map_count: each run of mapped "
               "pages and each gap between runs costs one mapping)";
  }
  throw std::system_error(err, std::generic_category(), message);
}

// The bracketed word of a sysfs choice file ("always [advise] never"), or "".
std::string sysfs_choice(const char* path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  const size_t open = line.find('[');
  const size_t close = line.find(']', open);
  if (open == std::string::npos || close == std::string::npos) return "";
  return line.substr(open + 1, close - open - 1);
}

// Whether madvise(MADV_HUGEPAGE) would change anything for shmem: only where
// the effective setting for 2 MiB pages is "advise" (the others either always
// or never use huge pages). Read once; the syscall costs ~0.5 us per map.
bool shmem_thp_wants_advice() {
  static const bool wants = [] {
    std::string choice =
        sysfs_choice("/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled");
    if (choice.empty() || choice == "inherit") {
      choice = sysfs_choice("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
    }
    return choice == "advise";
  }();
  return wants;
}

int64_t system_page_bytes() {
  static const int64_t bytes = sysconf(_SC_PAGESIZE);
  return bytes;
}

}  // namespace

VmmPool::VmmPool(int64_t reserve_bytes, int64_t page_bytes) {
  const int64_t sys_page = system_page_bytes();
  if (page_bytes <= 0 || page_bytes % sys_page != 0) {
    invalid("page_bytes must be a positive multiple of the system page size (", sys_page,
            " bytes), got ", page_bytes);
  }
  if (reserve_bytes <= 0 || reserve_bytes % page_bytes != 0) {
    invalid("reserve_bytes must be a positive multiple of page_bytes (", page_bytes,
            "), got ", reserve_bytes);
  }
  // Align the base to 2 MiB when pages are whole huge pages, so that the kernel
  // can back them with transparent huge pages where the system enables them.
  const bool whole_huge_pages = page_bytes % kHugePageBytes == 0;
  advise_huge_ = whole_huge_pages && shmem_thp_wants_advice();
  const int64_t align = whole_huge_pages ? kHugePageBytes : sys_page;
  if (reserve_bytes > std::numeric_limits<int64_t>::max() - align) {
    invalid("reserve_bytes is too large: ", reserve_bytes);
  }
  reserve_bytes_ = reserve_bytes;
  page_bytes_ = page_bytes;
  num_pages_ = reserve_bytes / page_bytes;

  fd_ = memfd_create("xllm-vmm", MFD_CLOEXEC);
  if (fd_ < 0) throw_errno(errno, "memfd_create failed");
  // A sparse file the size of the reservation: it holds no memory until touched.
  if (ftruncate(fd_, reserve_bytes) != 0) {
    const int err = errno;
    close(fd_);
    throw_errno(err, "ftruncate of the memfd to reserve_bytes = " + std::to_string(reserve_bytes) +
                         " failed");
  }
  const size_t span = static_cast<size_t>(reserve_bytes + align - sys_page);
  void* raw = mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) {
    const int err = errno;
    close(fd_);
    throw_errno(err, "reserving " + std::to_string(reserve_bytes) + " bytes of address space failed");
  }
  // Trim the over-reservation to an aligned range of exactly reserve_bytes.
  const auto start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + align - 1) / align * align;
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t end = aligned + static_cast<uintptr_t>(reserve_bytes);
  if (start + span > end) munmap(reinterpret_cast<void*>(end), start + span - end);
  base_ = reinterpret_cast<char*>(aligned);
  mapped_bits_.assign(static_cast<size_t>((num_pages_ + 63) / 64), 0);
}

VmmPool::~VmmPool() {
  // Unmapping the whole range drops every page mapping; closing the memfd then
  // frees its memory.
  if (base_ != nullptr) munmap(base_, static_cast<size_t>(reserve_bytes_));
  if (fd_ >= 0) close(fd_);
}

void VmmPool::check_open() const {
  if (released_) {
    invalid("this VmmPool was released; create a new one to map pages again");
  }
}

int64_t VmmPool::page_index(int64_t offset, const char* name, const char* verb) const {
  if (offset < 0) invalid(name, " must be >= 0, got ", offset);
  if (offset % page_bytes_ != 0) {
    invalid(name, " must be a multiple of page_bytes (", page_bytes_, "), got ", offset);
  }
  if (offset > reserve_bytes_ - page_bytes_) {
    invalid(name, " = ", offset, " plus page_bytes ", page_bytes_,
            " runs past the reservation of reserved_bytes = ", reserve_bytes_, " bytes; ", verb,
            " past the reservation is refused (the last page starts at offset ",
            reserve_bytes_ - page_bytes_, ")");
  }
  return offset / page_bytes_;
}

bool VmmPool::test_bit(int64_t page) const {
  return (mapped_bits_[static_cast<size_t>(page >> 6)] >> (page & 63)) & 1;
}

void VmmPool::set_bits(const Run& run, bool mapped) {
  for (int64_t p = run.first; p < run.first + run.count; ++p) {
    uint64_t& word = mapped_bits_[static_cast<size_t>(p >> 6)];
    const uint64_t bit = uint64_t{1} << (p & 63);
    if (mapped && !(word & bit)) {
      word |= bit;
      ++mapped_count_;
    } else if (!mapped && (word & bit)) {
      word &= ~bit;
      --mapped_count_;
    }
  }
}

std::vector<VmmPool::Run> VmmPool::batch_runs(const std::vector<int64_t>& offsets,
                                              bool want_mapped, const char* verb) const {
  std::vector<std::pair<int64_t, size_t>> pages;  // (page index, position in offsets)
  pages.reserve(offsets.size());
  for (size_t i = 0; i < offsets.size(); ++i) {
    const std::string name = "offsets[" + std::to_string(i) + "]";
    const int64_t page = page_index(offsets[i], name.c_str(), verb);
    if (test_bit(page) != want_mapped) {
      invalid(name, " = ", offsets[i], want_mapped ? " is not mapped" : " is already mapped",
              "; nothing in this call was changed");
    }
    pages.emplace_back(page, i);
  }
  std::sort(pages.begin(), pages.end());
  std::vector<Run> runs;
  for (size_t k = 0; k < pages.size(); ++k) {
    if (k > 0 && pages[k].first == pages[k - 1].first) {
      const auto [a, b] = std::minmax(pages[k - 1].second, pages[k].second);
      invalid("offsets[", b, "] repeats offsets[", a, "] = ", offsets[a],
              "; each page may appear once per call");
    }
    if (!runs.empty() && runs.back().first + runs.back().count == pages[k].first) {
      ++runs.back().count;
    } else {
      runs.push_back({pages[k].first, 1});
    }
  }
  return runs;
}

void VmmPool::map_run(const Run& run) {
  char* at = page_ptr(run.first);
  const size_t len = static_cast<size_t>(run.count * page_bytes_);
  const off_t file_offset = static_cast<off_t>(run.first * page_bytes_);
  // A hole reads as zeros, but should a punch ever have failed the range may
  // hold old data: punch again so a mapped page is always zeroed.
  if (punch_failed_) punch_run(run);
  void* got = mmap(at, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd_, file_offset);
  if (got == MAP_FAILED) {
    const int err = errno;
    // A failed MAP_FIXED may already have dropped the old mapping; put the
    // reservation back so no other mapping can land inside our range.
    mmap(at, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    throw_errno(err, "mmap of " + std::to_string(run.count) + " page(s) at offset " +
                         std::to_string(file_offset) + " failed",
                true);
  }
  // Ask for huge pages where the system hands them out on request only.
  if (advise_huge_) madvise(at, len, MADV_HUGEPAGE);
}

void VmmPool::protect_run(const Run& run) {
  char* at = page_ptr(run.first);
  const size_t len = static_cast<size_t>(run.count * page_bytes_);
  void* got = mmap(at, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
                   -1, 0);
  if (got == MAP_FAILED) {
    throw_errno(errno, "restoring the PROT_NONE reservation over " + std::to_string(run.count) +
                           " page(s) at offset " + std::to_string(run.first * page_bytes_) +
                           " failed",
                true);
  }
}

void VmmPool::punch_run(const Run& run) {
  const off_t offset = static_cast<off_t>(run.first * page_bytes_);
  const off_t len = static_cast<off_t>(run.count * page_bytes_);
  if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len) != 0) {
    punch_failed_ = true;
    throw_errno(errno, "releasing the memory of " + std::to_string(run.count) +
                           " page(s) at offset " + std::to_string(offset) +
                           " (fallocate PUNCH_HOLE) failed");
  }
}

void VmmPool::do_map(const std::vector<Run>& runs) {
  for (size_t i = 0; i < runs.size(); ++i) {
    try {
      map_run(runs[i]);
    } catch (...) {
      // All or nothing: take back what this call mapped. Untouched pages hold
      // no memory, but a racing writer may have touched them, so punch too.
      for (size_t j = 0; j < i; ++j) {
        try {
          protect_run(runs[j]);
          set_bits(runs[j], false);
          punch_run(runs[j]);
        } catch (...) {
          // The bits already say exactly which pages are still mapped.
        }
      }
      throw;
    }
    set_bits(runs[i], true);
  }
}

bool VmmPool::none_mapped(int64_t first, int64_t end) const {
  for (int64_t p = first; p < end;) {
    const int64_t word = p >> 6;
    const int64_t stop = std::min(end, (word + 1) << 6);
    // Bits [p, stop) of this word.
    const int lo = static_cast<int>(p & 63);
    const int len = static_cast<int>(stop - p);
    const uint64_t mask = (len == 64 ? ~uint64_t{0} : ((uint64_t{1} << len) - 1)) << lo;
    if (mapped_bits_[static_cast<size_t>(word)] & mask) return false;
    p = stop;
  }
  return true;
}

std::vector<VmmPool::Run> VmmPool::unmap_spans(const std::vector<Run>& runs) const {
  // An unmapped page is always PROT_NONE over a punched hole, so doing both
  // again is a no-op: runs separated only by unmapped pages can share one
  // mmap and one punch. Scattered frees (every other page) then cost two
  // syscalls per call instead of two per page. Long gaps are not scanned.
  constexpr int64_t kMaxGapPages = 4096;
  std::vector<Run> spans;
  for (const Run& run : runs) {
    if (!spans.empty()) {
      Run& last = spans.back();
      const int64_t gap_first = last.first + last.count;
      if (run.first - gap_first <= kMaxGapPages && none_mapped(gap_first, run.first)) {
        last.count = run.first + run.count - last.first;
        continue;
      }
    }
    spans.push_back(run);
  }
  return spans;
}

void VmmPool::do_unmap(const std::vector<Run>& runs) {
  const std::vector<Run> spans = unmap_spans(runs);
  // First take every span out of the address space; memory is punched only
  // when all succeeded, so a failure can be undone by mapping the data back.
  for (size_t i = 0; i < spans.size(); ++i) {
    try {
      protect_run(spans[i]);
    } catch (...) {
      // The runs of the spans already done: map them back (the gaps between
      // them were unmapped before and stay so).
      for (const Run& run : runs) {
        if (run.first >= spans[i].first) break;
        try {
          map_run(run);
        } catch (...) {
          // Could not restore it: it stays unmapped, so record that and free it.
          set_bits(run, false);
          try {
            punch_run(run);
          } catch (...) {
          }
        }
      }
      throw;
    }
  }
  for (const Run& run : runs) set_bits(run, false);
  for (const Run& span : spans) punch_run(span);
}

void VmmPool::map_page(int64_t offset) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  const int64_t page = page_index(offset, "offset", "mapping");
  if (test_bit(page)) invalid("offset = ", offset, " is already mapped");
  do_map({Run{page, 1}});
}

void VmmPool::unmap_page(int64_t offset) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  const int64_t page = page_index(offset, "offset", "unmapping");
  if (!test_bit(page)) invalid("offset = ", offset, " is not mapped");
  do_unmap({Run{page, 1}});
}

void VmmPool::map_pages(const std::vector<int64_t>& offsets) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  do_map(batch_runs(offsets, false, "mapping"));
}

void VmmPool::unmap_pages(const std::vector<int64_t>& offsets) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  do_unmap(batch_runs(offsets, true, "unmapping"));
}

bool VmmPool::is_mapped(int64_t offset) const {
  std::lock_guard<std::mutex> lock(mu_);
  return test_bit(page_index(offset, "offset", "querying"));
}

std::vector<int64_t> VmmPool::mapped_offsets() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(mapped_count_));
  for (size_t w = 0; w < mapped_bits_.size(); ++w) {
    for (uint64_t word = mapped_bits_[w]; word != 0; word &= word - 1) {
      const int64_t page = static_cast<int64_t>(w * 64) + __builtin_ctzll(word);
      out.push_back(page * page_bytes_);
    }
  }
  return out;
}

int64_t VmmPool::physical_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return mapped_count_ * page_bytes_;
}

int64_t VmmPool::resident_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (released_) return 0;
  struct stat st;
  if (fstat(fd_, &st) != 0) throw_errno(errno, "fstat of the memfd failed");
  // st_blocks counts 512-byte units of memory the file really holds.
  return static_cast<int64_t>(st.st_blocks) * 512;
}

void VmmPool::release() {
  std::lock_guard<std::mutex> lock(mu_);
  if (released_) return;
  // One PROT_NONE mapping over the whole range unmaps every page at once and
  // keeps the addresses reserved until the destructor.
  protect_run(Run{0, num_pages_});
  close(fd_);  // no mapping refers to it any more, so this frees its memory
  fd_ = -1;
  std::fill(mapped_bits_.begin(), mapped_bits_.end(), 0);
  mapped_count_ = 0;
  released_ = true;
}

bool VmmPool::released() const {
  std::lock_guard<std::mutex> lock(mu_);
  return released_;
}

}  // namespace xllm
