// One exception type for every user-facing failure: bad files, bad configs, bad requests.
// The message is what the user sees, so it names the file, the tensor or the flag at fault.
#pragma once
#include <stdexcept>
#include <string>

namespace afm {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace afm
