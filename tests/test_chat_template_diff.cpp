// Differential test of chat templates: `afm template` against jinja2 set up as transformers renders
// (tests/oracles/render_chat_template.py), on the real templates of tests/fixtures/chat_templates/
// times every conversation there, with add_generation_prompt both ways. The prompt must be byte-equal,
// and where the template raises (Gemma rejecting a system turn, Mistral requiring alternation, ...)
// afm must fail with an error too.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "support/subprocess.h"

namespace fs = std::filesystem;
using nlohmann::ordered_json;

namespace {

const fs::path kFixtures = fs::path(AFM_SOURCE_DIR) / "tests/fixtures/chat_templates";

// Cases afm cannot render because of a construct it does not implement, as "template/conversation".
// afm must fail on them with an error naming the construct. None today.
const std::set<std::string> kUnsupported = {};

ordered_json read_json(const fs::path& path) {
  std::ifstream in(path);
  return ordered_json::parse(in);
}

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// A single-quoted shell word.
std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

struct Case {
  std::string name;  // template/conversation[/variant]/agp
  std::string key;   // template/conversation, as kUnsupported lists it
  std::string afm_args;
  ordered_json oracle;  // the oracle's case object
};

}  // namespace

TEST(ChatTemplateDiff, RealTemplatesMatchJinja2) {
  const fs::path work = fs::path(testing::TempDir()) / "afm_chat_template_diff";
  fs::remove_all(work);
  fs::create_directories(work);

  std::vector<fs::path> conversations;
  for (const auto& entry : fs::directory_iterator(kFixtures / "conversations")) conversations.push_back(entry.path());
  std::sort(conversations.begin(), conversations.end());
  ASSERT_GE(conversations.size(), 10u);

  // Each conversation's messages and tools as the files `afm template` reads.
  std::vector<ordered_json> conversation_json;
  for (const fs::path& path : conversations) {
    ordered_json c = read_json(path);
    const std::string stem = path.stem().string();
    write_file(work / (stem + ".messages.json"), c["messages"].dump());
    if (c.contains("tools")) write_file(work / (stem + ".tools.json"), c["tools"].dump());
    conversation_json.push_back(std::move(c));
  }

  const ordered_json manifest = read_json(kFixtures / "templates.json");
  ASSERT_GE(manifest.size(), 25u);
  std::vector<Case> cases;
  for (auto t = manifest.begin(); t != manifest.end(); ++t) {
    const fs::path template_path = kFixtures / (t.key() + ".jinja");
    ASSERT_TRUE(fs::exists(template_path)) << template_path;
    ordered_json variants = t->value("variants", ordered_json::array({ordered_json::object()}));
    for (size_t v = 0; v < variants.size(); v++) {
      for (size_t c = 0; c < conversations.size(); c++) {
        const std::string stem = conversations[c].stem().string();
        for (bool agp : {false, true}) {
          ordered_json vars = {{"bos_token", (*t)["bos_token"]}, {"eos_token", (*t)["eos_token"]}};
          vars.update(variants[v]);
          Case k;
          k.key = t.key() + "/" + stem;
          k.name = k.key + (v ? "/variant" + std::to_string(v) : "") + (agp ? "/agp" : "");
          k.afm_args = " --template " + shell_quote(template_path.string()) + " --messages " +
                       shell_quote((work / (stem + ".messages.json")).string());
          if (conversation_json[c].contains("tools"))
            k.afm_args += " --tools " + shell_quote((work / (stem + ".tools.json")).string());
          if (agp) k.afm_args += " --add-generation-prompt";
          for (auto it = vars.begin(); it != vars.end(); ++it)
            k.afm_args += " --var " + shell_quote(it.key() + "=" + it.value().dump());
          k.oracle = {{"template", template_path.string()},
                      {"messages", conversation_json[c]["messages"]},
                      {"tools", conversation_json[c].value("tools", ordered_json())},
                      {"add_generation_prompt", agp},
                      {"vars", vars}};
          cases.push_back(std::move(k));
        }
      }
    }
  }

  // One Python process renders every case.
  ordered_json oracle_cases = ordered_json::array();
  for (const Case& k : cases) oracle_cases.push_back(k.oracle);
  write_file(work / "cases.json", oracle_cases.dump());
  auto oracle = afm::test::run_oracle("render_chat_template.py --batch " + shell_quote((work / "cases.json").string()) +
                                      " --out " + shell_quote((work / "results.json").string()));
  ASSERT_EQ(oracle.status, 0) << "the jinja2 oracle failed";
  const ordered_json results = read_json(work / "results.json");
  ASSERT_EQ(results.size(), cases.size());

  int rendered = 0, raised = 0, unsupported = 0;
  for (size_t i = 0; i < cases.size(); i++) {
    const Case& k = cases[i];
    const ordered_json& expected = results[i];
    auto afm = afm::test::run_command(std::string(AFM_BINARY) + " template" + k.afm_args + " 2>" +
                                      shell_quote((work / "stderr.txt").string()));
    std::ifstream err_file(work / "stderr.txt");
    std::stringstream err;
    err << err_file.rdbuf();
    if (kUnsupported.count(k.key)) {
      unsupported++;
      EXPECT_EQ(afm.status, 1) << k.name;
      EXPECT_NE(err.str().find("unsupported"), std::string::npos) << k.name << ": " << err.str();
      continue;
    }
    if (!expected["ok"].get<bool>()) {
      raised++;
      // Both sides reject the conversation; afm with an error (exit 1), not a crash.
      EXPECT_EQ(afm.status, 1) << k.name << ": jinja2 raised " << expected["error"].get<std::string>()
                               << " but afm printed:\n" << afm.out;
      continue;
    }
    rendered++;
    EXPECT_EQ(afm.status, 0) << k.name << ": afm failed: " << err.str();
    EXPECT_EQ(afm.out, expected["text"].get<std::string>()) << k.name;
  }
  std::printf("chat templates: %zu cases over %zu templates x %zu conversations: %d rendered, %d raised on both "
              "sides, %d unsupported\n",
              cases.size(), manifest.size(), conversations.size(), rendered, raised, unsupported);
  EXPECT_GT(rendered, raised);
}

// The command's own error handling: bad input is a clear error and exit status 1, never a crash.
TEST(ChatTemplateDiff, BadInputIsAClearError) {
  const fs::path work = fs::path(testing::TempDir()) / "afm_chat_template_errors";
  fs::create_directories(work);
  write_file(work / "ok.json", R"([{"role": "user", "content": "hi"}])");
  write_file(work / "broken.json", R"([{"role": "user", )");
  write_file(work / "object.json", R"({"role": "user"})");
  write_file(work / "bad.jinja", "{% for m in messages %}{{ m.content ");
  const std::string afm = std::string(AFM_BINARY) + " template ";
  auto run = [&](const std::string& args) { return afm::test::run_command(afm + args + " 2>&1"); };
  struct Bad {
    std::string args, message;
  } bad[] = {
      {"--messages " + (work / "missing.json").string(), "cannot read"},
      {"--messages " + (work / "broken.json").string(), "not valid JSON"},
      {"--messages " + (work / "object.json").string(), "JSON array"},
      {"--messages " + (work / "ok.json").string() + " --template " + (work / "bad.jinja").string(), "unclosed"},
      {"--messages " + (work / "ok.json").string() + " --var nojson", "KEY=JSON"},
      {"--messages " + (work / "ok.json").string() + " --var x=notjson", "not JSON"},
      {"--messages " + (work / "ok.json").string() + " --tools " + (work / "object.json").string(), "JSON array"},
  };
  for (const Bad& b : bad) {
    auto r = run(b.args);
    EXPECT_EQ(r.status, 1) << b.args << "\n" << r.out;
    EXPECT_NE(r.out.find(b.message), std::string::npos) << b.args << "\n" << r.out;
  }
  auto ok = run("--messages " + (work / "ok.json").string() + " --add-generation-prompt");
  EXPECT_EQ(ok.status, 0) << ok.out;
  EXPECT_NE(ok.out.find("hi"), std::string::npos);
}
