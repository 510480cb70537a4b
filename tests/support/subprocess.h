// Running the afm binary and the reference scripts of tests/oracles/ from a test.
#pragma once
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <string>

namespace afm::test {

struct Result {
  int status = -1;  // the exit code, or -1 when the process did not exit normally
  std::string out;  // what it wrote to stdout
};

// Runs `command` through the shell with stdin from /dev/null unless the command redirects it.
inline Result run_command(const std::string& command) {
  Result run;
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return run;
  std::array<char, 65536> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) run.out.append(buf.data(), n);
  const int status = pclose(pipe);
  run.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}

// `python3 tests/oracles/SCRIPT ARGS` with the virtualenv that scripts/install-deps.sh makes from
// requirements.txt, where the reference packages (tokenizers, jinja2, gguf, numpy) live.
inline Result run_oracle(const std::string& script_and_args) {
  return run_command(std::string(AFM_SOURCE_DIR) + "/.venv/bin/python " + AFM_SOURCE_DIR + "/tests/oracles/" +
                     script_and_args + " < /dev/null");
}

}  // namespace afm::test
