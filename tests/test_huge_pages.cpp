// huge_page_buffer: zero-filled and writable at every size, 2 MiB-aligned when it is large
// enough to hold huge pages, and released when its last owner goes.
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>

#include "huge_pages.h"

namespace {

TEST(HugePageBuffer, ZeroFilledWritableAndAlignedWhenLarge) {
  for (int64_t bytes : {int64_t(1), int64_t(4096), (int64_t(2) << 20) - 1, int64_t(2) << 20, (int64_t(5) << 20) + 3}) {
    std::shared_ptr<uint8_t[]> buffer = afm::huge_page_buffer(bytes);
    ASSERT_NE(buffer, nullptr);
    if (bytes >= (int64_t(2) << 20)) {
      EXPECT_EQ(uintptr_t(buffer.get()) % (uintptr_t(2) << 20), 0u) << bytes;
    }
    int64_t nonzero = 0;
    for (int64_t i = 0; i < bytes; i++) nonzero += buffer[i] != 0;
    EXPECT_EQ(nonzero, 0) << bytes;
    for (int64_t i = 0; i < bytes; i += 4093) buffer[i] = 0xAB;
    buffer[bytes - 1] = 0xCD;
    EXPECT_EQ(buffer[bytes - 1], 0xCD);
  }
}

}  // namespace
