// Large buffers that stream at the memory's full rate. With 4 KiB pages the hardware prefetcher
// stops at every page boundary and each page costs a TLB walk; in 2 MiB transparent huge pages a
// whole-buffer read ran 10-15% faster on the development Xeon (docs/PERFORMANCE.md). Linux lends
// them only to regions marked with madvise when THP is in its default "madvise" mode.
#pragma once
#include <cstdint>
#include <memory>

namespace afm {

// A zero-filled buffer of `bytes`, in huge pages where the kernel grants them (ordinary pages
// otherwise). Throws afm::Error when the memory cannot be mapped.
std::shared_ptr<uint8_t[]> huge_page_buffer(int64_t bytes);

}  // namespace afm
