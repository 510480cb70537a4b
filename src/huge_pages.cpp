#include "huge_pages.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "error.h"

namespace afm {

std::shared_ptr<uint8_t[]> huge_page_buffer(int64_t bytes) {
  constexpr size_t kHugePage = size_t(2) << 20;
  // A small buffer would hold a whole huge page of memory for a few bytes.
  if (bytes < int64_t(kHugePage)) return std::shared_ptr<uint8_t[]>(new uint8_t[size_t(bytes)]());
  // Map a huge page more than needed, so the buffer can start on a huge-page boundary.
  const size_t size = (size_t(bytes) + kHugePage - 1) / kHugePage * kHugePage;
  void* mapping = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapping == MAP_FAILED)
    throw Error("cannot map " + std::to_string(bytes) + " bytes: " + std::strerror(errno));
  auto* aligned = reinterpret_cast<uint8_t*>((uintptr_t(mapping) + kHugePage - 1) / kHugePage * kHugePage);
  madvise(aligned, size, MADV_HUGEPAGE);  // advice only: without THP the pages stay small
  return std::shared_ptr<uint8_t[]>(aligned, [mapping, size](uint8_t*) { munmap(mapping, size + kHugePage); });
}

}  // namespace afm
