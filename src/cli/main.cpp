// afm: the command-line front end. Each subcommand registers its flags with CLI11 and calls the library.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "cli/common.h"
#include "error.h"

int main(int argc, char** argv) {
  CLI::App app{"afm: an inference engine for Arcee AFM-4.5B and Llama-family models"};
  app.require_subcommand(1);
  afm::cli::add_generate_commands(app);
  afm::cli::add_eval_command(app);
  afm::cli::add_tokenize_commands(app);
  afm::cli::add_perplexity_command(app);
  afm::cli::add_bench_command(app);
  afm::cli::add_convert_command(app);
  afm::cli::add_init_command(app);
  afm::cli::add_template_command(app);
  afm::cli::add_serve_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const afm::Error& e) {
    std::fprintf(stderr, "\nafm: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "\nafm: error: out of memory (a smaller --max-seq-len or weight format may fit)\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\nafm: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
