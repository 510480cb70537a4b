// Chat template rendering: the two HF references byte for byte, then each Jinja construct against
// outputs worked out from Jinja2's semantics (as HF configures it: trim_blocks, lstrip_blocks).
#include "chat_template.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "error.h"

using afm::ChatMessage;
using afm::ChatTemplate;
using json = nlohmann::ordered_json;

namespace {

const std::string kRoot = AFM_SOURCE_DIR;

std::string render(const std::string& source, const json& context = json::object()) {
  return ChatTemplate::parse(source).render(context);
}

// The afm::Error message from rendering (or parsing) `source`; fails the test if nothing is thrown.
std::string error_of(const std::string& source, const json& context = json::object()) {
  try {
    render(source, context);
  } catch (const afm::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no afm::Error for: " << source;
  return "";
}

void expect_matches_reference(const std::string& fixture) {
  std::string dir = kRoot + "/tests/fixtures/" + fixture;
  ChatTemplate tmpl = ChatTemplate::from_tokenizer_config(dir + "/tokenizer_config.json");
  std::ifstream file(dir + "/reference.json");
  ASSERT_TRUE(file) << dir;
  nlohmann::json chat = nlohmann::json::parse(file)["chat"];
  std::vector<ChatMessage> messages;
  for (const auto& m : chat["messages"]) messages.push_back({m["role"], m["content"]});
  ASSERT_EQ(messages.size(), 4u);
  EXPECT_EQ(tmpl.render(messages, chat["add_generation_prompt"].get<bool>()), chat["text"].get<std::string>());
}

const std::vector<ChatMessage> kChat = {{"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello."}};

}  // namespace

// ------------------------------------------------------------------------------------------ references

TEST(ChatTemplateReference, AustenChatML) { expect_matches_reference("tokenizer-austen-4k"); }

TEST(ChatTemplateReference, Llama3) { expect_matches_reference("tokenizer-llama3"); }

TEST(ChatTemplateReference, Llama3WithoutGenerationPromptAndTrimmedContent) {
  // The Llama-3 template trims content (`|trim` binds tighter than `+`) and always appends the header.
  ChatTemplate tmpl = ChatTemplate::from_tokenizer_config(kRoot + "/tests/fixtures/tokenizer-llama3/tokenizer_config.json");
  EXPECT_EQ(tmpl.render({{"user", "  hi \n"}}, false),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

TEST(ChatTemplateReference, ModelConfigsLoad) {
  const std::string chatml =
      "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
      "<|im_start|>assistant\nHello.<|im_end|>\n";
  for (const char* path : {"/tests/fixtures/tiny-arcee/tokenizer_config.json", "/models/afm-tiny-austen/tokenizer_config.json"}) {
    ChatTemplate tmpl = ChatTemplate::from_tokenizer_config(kRoot + path);
    EXPECT_EQ(tmpl.render(kChat, false), chatml) << path;
    EXPECT_EQ(tmpl.render(kChat, true), chatml + "<|im_start|>assistant\n") << path;
  }
}

TEST(ChatTemplateConfig, TokenObjectsNamedTemplatesAndJinjaFile) {
  namespace fs = std::filesystem;
  fs::path dir = fs::temp_directory_path() / ("afm_chat_template_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  auto write = [&](const char* name, const std::string& text) { std::ofstream(dir / name) << text; };

  // bos/eos as AddedToken objects; chat_template as a list of named templates.
  write("tokenizer_config.json", R"({
    "bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
    "chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ bos_token }}|{{ eos_token }}"}]
  })");
  EXPECT_EQ(ChatTemplate::from_tokenizer_config((dir / "tokenizer_config.json").string()).render({}, false), "<s>|</s>");

  // No chat_template in the config: newer transformers write chat_template.jinja beside it.
  // A null bos_token leaves the variable undefined.
  write("tokenizer_config.json", R"({"bos_token": null, "eos_token": "</s>"})");
  write("chat_template.jinja", "{{ bos_token is defined }}{% for m in messages %}[{{ m.content }}]{% endfor %}\n");
  EXPECT_EQ(ChatTemplate::from_tokenizer_config((dir / "tokenizer_config.json").string()).render({{"user", "a"}}, false),
            "False[a]");

  fs::remove(dir / "chat_template.jinja");
  try {
    ChatTemplate::from_tokenizer_config((dir / "tokenizer_config.json").string());
    ADD_FAILURE() << "expected an error for a config without a chat template";
  } catch (const afm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("has no chat_template"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
  EXPECT_THROW(ChatTemplate::from_tokenizer_config((dir / "missing.json").string()), afm::Error);
}

// ------------------------------------------------------------------------------------------ expressions

TEST(ChatTemplateExpr, Literals) {
  EXPECT_EQ(render("{{ 'a' }}{{ \"b\" }}{{ 'c' 'd' }}{{ 'it\\'s\\n' }}"), "abcdit's\n");
  // Escapes decode as Python's unicode-escape: hex, \u, octal; unknown ones stay verbatim.
  EXPECT_EQ(render("{{ '\\x41\\u00e9\\u2581\\101\\d' }}"), "A\u00e9\u2581A\\d");
  EXPECT_EQ(render("{{ 42 }} {{ -7 }} {{ 1.5 }} {{ 2.0 }} {{ true }} {{ False }} {{ none }}"), "42 -7 1.5 2.0 True False None");
  // Containers print as Python's repr.
  EXPECT_EQ(render("{{ [1, 'a', none, true] }} {{ {'k': 'v', 'n': [1]} }} {{ [] }}"),
            "[1, 'a', None, True] {'k': 'v', 'n': [1]} []");
  EXPECT_EQ(render("{{ [\"it's\"] }}"), "[\"it's\"]");
  EXPECT_EQ(render("{{ 0.1 + 0.2 }} {{ 10000000000000000.0 }} {{ 0.0001 }} {{ 0.00001 * 1 }}"),
            "0.30000000000000004 1e+16 0.0001 1e-05");
}

TEST(ChatTemplateExpr, Arithmetic) {
  EXPECT_EQ(render("{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 7 - 10 }} {{ 2 ** 10 }}"), "7 9 -3 1024");
  // Python division: `/` is true division, `//` floors, `%` takes the divisor's sign.
  EXPECT_EQ(render("{{ 7 / 2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 % -3 }}"), "3.5 3 -4 1 2 -2");
  EXPECT_EQ(render("{{ 'ab' * 3 }} {{ [1] + [2, 3] }} {{ 1 + 0.5 }}"), "ababab [1, 2, 3] 1.5");
}

TEST(ChatTemplateExpr, StringConcatenation) {
  EXPECT_EQ(render("{{ 'a' + 'b' + 'c' }}"), "abc");
  EXPECT_EQ(render("{{ 'n=' ~ 3 ~ ', ' ~ none ~ ', ' ~ true ~ missing }}"), "n=3, None, True");
  // `+` does not convert like `~` does.
  EXPECT_NE(error_of("{{ 'a' + 1 }}").find("unsupported operand types for '+': string and integer"), std::string::npos);
}

TEST(ChatTemplateExpr, ComparisonsAndLogic) {
  EXPECT_EQ(render("{{ 1 == 1.0 }} {{ 'a' != 'b' }} {{ 2 < 3 <= 3 }} {{ 3 > 2 > 2 }} {{ 'abc' < 'abd' }}"),
            "True True True False True");
  EXPECT_EQ(render("{{ 'ell' in 'hello' }} {{ 2 in [1, 2] }} {{ 'k' in {'k': 1} }} {{ 3 not in [1] }} {{ not 1 in [1] }}"),
            "True True True True False");
  // and/or return an operand, as in Python.
  EXPECT_EQ(render("{{ 0 or 'x' }} {{ 'a' and 'b' }} {{ '' and 'b' }}|{{ not '' }} {{ not 0 or 0 }}"), "x b |True True");
  EXPECT_EQ(render("{{ [1] == [1] }} {{ {'a': 1} == {'a': 1} }} {{ none == none }} {{ 1 == '1' }}"), "True True True False");
}

TEST(ChatTemplateExpr, Ternary) {
  EXPECT_EQ(render("{{ 'y' if 1 else 'n' }}{{ 'y' if 0 else 'n' }}[{{ 'y' if 0 }}]"), "yn[]");
  EXPECT_EQ(render("{{ 'a' if x == 1 else 'b' if x == 2 else 'c' }}", {{"x", 2}}), "b");
}

TEST(ChatTemplateExpr, AttributesSubscriptsAndSlices) {
  json ctx = {{"messages", {{{"role", "system"}, {"content", "S"}}, {{"role", "user"}, {"content", "U"}}}}};
  EXPECT_EQ(render("{{ messages[0]['role'] }} {{ messages[1].content }} {{ messages[-1].role }} {{ messages.0.content }}", ctx),
            "system U user S");
  // Missing keys and out-of-range indices are undefined, which prints as nothing.
  EXPECT_EQ(render("[{{ messages[0].name }}][{{ messages[5] }}][{{ messages[0].name is defined }}]", ctx), "[][][False]");
  EXPECT_EQ(render("{% for m in messages[1:] %}{{ m.role }}{% endfor %}", ctx), "user");
  EXPECT_EQ(render("{{ [1, 2, 3, 4][1:3] }} {{ [1, 2, 3][::-1] }} {{ [1, 2, 3][:-1] }} {{ 'hello'[1:] }} {{ 'hello'[::2] }}"),
            "[2, 3] [3, 2, 1] [1, 2] ello hlo");
  // Strings index by code point, not by byte.
  EXPECT_EQ(render("{{ 'héllo'[1] }}{{ 'héllo'[:2] }}{{ 'héllo'|length }}"), "éhé5");
}

TEST(ChatTemplateExpr, Tests) {
  json ctx = {{"s", "x"}, {"n", nullptr}, {"i", 3}, {"l", {1}}, {"d", {{"a", 1}}}};
  EXPECT_EQ(render("{{ s is defined }}{{ q is defined }}{{ q is undefined }}{{ n is none }}{{ s is none }}", ctx),
            "TrueFalseTrueTrueFalse");
  EXPECT_EQ(render("{{ s is string }}{{ i is string }}{{ i is number }}{{ i is odd }}{{ i is even }}{{ i is divisibleby 3 }}", ctx),
            "TrueFalseTrueTrueFalseTrue");
  EXPECT_EQ(render("{{ d is mapping }}{{ l is mapping }}{{ l is iterable }}{{ s is not none }}{{ not q is defined }}", ctx),
            "TrueFalseTrueTrueTrue");
  // Python's bool is a number but not an integer; undefined iterates as empty.
  EXPECT_EQ(render("{{ true is number }}{{ true is integer }}{{ q is iterable }}", ctx), "TrueFalseTrue");
  EXPECT_EQ(render("{{ i is eq(3) }}{{ i is equalto 4 }}{{ i is gt 2 }}", ctx), "TrueFalseTrue");
}

TEST(ChatTemplateExpr, Filters) {
  EXPECT_EQ(render("[{{ '  a b \n'|trim }}][{{ 'xxaxx'|trim('x') }}]"), "[a b][a]");
  EXPECT_EQ(render("{{ 'abc'|length }} {{ [1, 2]|length }} {{ {'a': 1}|count }} {{ missing|length }}"), "3 2 1 0");
  EXPECT_EQ(render("{{ 'MiXed'|upper }} {{ 'MiXed'|lower }} {{ 'hello world'|capitalize }} {{ 'hello world'|title }}"),
            "MIXED mixed Hello world Hello World");
  EXPECT_EQ(render("{{ missing|default('d') }} {{ ''|default('d') }} {{ ''|default('d', true) }} {{ 'v'|d('d') }}"), "d  d v");
  EXPECT_EQ(render("{{ 5|string + '!' }} {{ [1, 2]|first }} {{ [1, 2]|last }} {{ 'abc'|first }} {{ 'abc'|last }}"),
            "5! 1 2 a c");
  EXPECT_EQ(render("{{ ['a', 'b']|join(', ') }} {{ [1, 2]|join }} {{ 'a-b-c'|replace('-', '+') }} {{ [1, 2]|reverse|list }}"),
            "a, b 12 a+b+c [2, 1]");
  EXPECT_EQ(render("{{ '42'|int + 1 }} {{ 'x'|int }} {{ 3|float }} {{ -2|abs }}"), "43 0 3.0 2");
  // Filters bind tighter than `+`: only the middle operand is trimmed.
  EXPECT_EQ(render("{{ '[' + ' x '|trim + ']' }}"), "[x]");
  json ctx = {{"messages", {{{"role", "system"}, {"content", "S"}}, {{"role", "user"}, {"content", "U"}}}}};
  EXPECT_EQ(render("{{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|join }}"
                   "{{ messages|rejectattr('role', 'eq', 'user')|list|length }}",
                   ctx),
            "U1");
  EXPECT_EQ(render("{% for k, v in {'a': 1, 'b': 2}|items %}{{ k }}={{ v }};{% endfor %}"), "a=1;b=2;");
}

TEST(ChatTemplateExpr, ToJson) {
  // HF's tojson is json.dumps(ensure_ascii=False): Python separators, insertion order, no HTML escaping.
  json ctx = {{"tool", {{"name", "get <weather>"}, {"args", {{"city", "Zürich"}, {"days", 3}, {"ok", true}, {"x", nullptr}}}}}};
  EXPECT_EQ(render("{{ tool|tojson }}", ctx),
            R"({"name": "get <weather>", "args": {"city": "Zürich", "days": 3, "ok": true, "x": null}})");
  EXPECT_EQ(render("{{ [1, {'a': 'q\"\n'}]|tojson(indent=2) }}"), "[\n  1,\n  {\n    \"a\": \"q\\\"\\n\"\n  }\n]");
  EXPECT_EQ(render("{{ []|tojson(indent=2) }}{{ {}|tojson }}{{ 1.5|tojson }}"), "[]{}1.5");
}

TEST(ChatTemplateExpr, StringMethods) {
  EXPECT_EQ(render("[{{ '  x  '.strip() }}][{{ '  x  '.lstrip() }}][{{ '  x  '.rstrip() }}][{{ '--x--'.strip('-') }}]"),
            "[x][x  ][  x][x]");
  EXPECT_EQ(render("{{ 'hello'.startswith('he') }}{{ 'hello'.endswith('lo') }}{{ 'hello'.startswith('lo') }}"), "TrueTrueFalse");
  EXPECT_EQ(render("{{ '  a  b '.split() }} {{ 'a,b,,c'.split(',') }} {{ 'a,b,c'.split(',', 1) }} {{ 'a b c'.split()[-1] }}"),
            "['a', 'b'] ['a', 'b', '', 'c'] ['a', 'b,c'] c");
  EXPECT_EQ(render("{{ 'Ab'.upper() }}{{ 'Ab'.lower() }}{{ 'a.b'.replace('.', '/') }}{{ ', '.join(['x', 'y']) }}"), "ABaba/bx, y");
  EXPECT_EQ(render("{% set d = {'a': 1} %}{{ d.get('a') }} {{ d.get('b') }} {{ d.get('b', 2) }} {{ d.keys()|list }} {{ d.values()|list }}"),
            "1 None 2 ['a'] [1]");
}

TEST(ChatTemplateExpr, Globals) {
  EXPECT_EQ(render("{{ range(3)|list }} {{ range(1, 7, 2)|list }} {{ range(3, 0, -1)|list }}"), "[0, 1, 2] [1, 3, 5] [3, 2, 1]");
  // strftime_now formats the current local time; only its shape is stable.
  std::string year = render("{{ strftime_now('%Y') }}");
  EXPECT_EQ(year.size(), 4u);
  EXPECT_TRUE(std::all_of(year.begin(), year.end(), ::isdigit)) << year;
}

// ------------------------------------------------------------------------------------------ statements

TEST(ChatTemplateStmt, ForLoopVariables) {
  EXPECT_EQ(render("{% for x in ['a', 'b', 'c'] %}{{ loop.index0 }}{{ loop.index }}{{ x }}"
                   "{% if loop.first %}F{% endif %}{% if loop.last %}L{% endif %}/{{ loop.length }};{% endfor %}"),
            "01aF/3;12b/3;23cL/3;");
  EXPECT_EQ(render("{% for x in [1, 2, 3] %}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.previtem }}{{ loop.nextitem }},{% endfor %}"),
            "322,2113,102,");
  // Nested loops: the inner `loop` shadows the outer one, which comes back afterwards.
  EXPECT_EQ(render("{% for a in [1, 2] %}{% for b in 'xy' %}{{ a }}{{ b }}{{ loop.index }} {% endfor %}{{ loop.index }}|{% endfor %}"),
            "1x1 1y2 1|2x1 2y2 2|");
}

TEST(ChatTemplateStmt, ForFilterElseAndLoopControls) {
  // The loop filter runs first, so loop.index and loop.length count the kept items.
  EXPECT_EQ(render("{% for i in range(1, 5) if i is even %}{{ loop.index }}:{{ i }}/{{ loop.length }} {% endfor %}"), "1:2/2 2:4/2 ");
  EXPECT_EQ(render("{% for x in [] %}x{% else %}empty{% endfor %}{% for x in missing %}x{% else %}none{% endfor %}"), "emptynone");
  EXPECT_EQ(render("{% for i in range(10) %}{% if i == 3 %}{% break %}{% endif %}{% if i is odd %}{% continue %}{% endif %}{{ i }}{% endfor %}"),
            "02");
  EXPECT_EQ(render("{% for k in {'b': 1, 'a': 2} %}{{ k }}{% endfor %}{% for c in 'hé' %}[{{ c }}]{% endfor %}"), "ba[h][é]");
}

TEST(ChatTemplateStmt, IfElifElse) {
  const std::string tmpl = "{% if x == 1 %}one{% elif x == 2 %}two{% elif x == 3 %}three{% else %}many{% endif %}";
  EXPECT_EQ(render(tmpl, {{"x", 1}}), "one");
  EXPECT_EQ(render(tmpl, {{"x", 2}}), "two");
  EXPECT_EQ(render(tmpl, {{"x", 3}}), "three");
  EXPECT_EQ(render(tmpl, {{"x", 9}}), "many");
  EXPECT_EQ(render("{% if [] %}a{% elif {} %}b{% elif '' %}c{% elif missing %}d{% endif %}|{% if [0] %}e{% endif %}"), "|e");
}

TEST(ChatTemplateStmt, SetAndScoping) {
  EXPECT_EQ(render("{% set x = 'a' + 'b' %}{% set y = x ~ 1 %}{{ x }}{{ y }}"), "abab1");
  EXPECT_EQ(render("{% set a, b = [1, 2] %}{{ b }}{{ a }}"), "21");
  // A set inside a loop is local to that iteration; the outer value is untouched.
  EXPECT_EQ(render("{% set x = 0 %}{% for i in [1, 2] %}[{{ x }}]{% set x = i %}{{ x }}{% endfor %}[{{ x }}]"), "[0]1[0]2[0]");
  // A set inside an if is not scoped.
  EXPECT_EQ(render("{% if true %}{% set x = 5 %}{% endif %}{{ x }}"), "5");
  EXPECT_EQ(render("{% set block %}a{{ 1 + 1 }}b{% endset %}[{{ block }}]"), "[a2b]");
}

TEST(ChatTemplateStmt, Namespace) {
  EXPECT_EQ(render("{% set ns = namespace(total=0, seen=false) %}{% for i in [1, 2, 3] %}{% set ns.total = ns.total + i %}"
                   "{% set ns.seen = true %}{% endfor %}{{ ns.total }} {{ ns.seen }}"),
            "6 True");
  // The pattern real templates use to pull the system message out of the loop.
  json ctx = {{"messages", {{{"role", "system"}, {"content", "S"}}, {{"role", "user"}, {"content", "U"}}}}};
  EXPECT_EQ(render("{% set ns = namespace(system='') %}{% for m in messages %}{% if m.role == 'system' %}"
                   "{% set ns.system = m.content %}{% endif %}{% endfor %}<{{ ns.system }}>",
                   ctx),
            "<S>");
  EXPECT_NE(error_of("{% set x = 1 %}{% set x.y = 2 %}").find("only namespace() objects are assignable"), std::string::npos);
}

TEST(ChatTemplateStmt, Comments) {
  EXPECT_EQ(render("a{# ignored {{ x }} {% if %} #}b"), "ab");
  EXPECT_EQ(render("a {#- trimmed -#} b"), "ab");
}

// ------------------------------------------------------------------------------------------ whitespace

TEST(ChatTemplateWhitespace, ExplicitTrim) {
  EXPECT_EQ(render("a  {{- 'b' -}}  \n c"), "abc");
  EXPECT_EQ(render("a \n {%- if true -%} \n b \n {%- endif -%} \n c"), "abc");
  EXPECT_EQ(render("{%- for x in [1, 2] -%}\n  {{ x }}\n{%- endfor %}\n"), "12");
}

TEST(ChatTemplateWhitespace, TrimBlocks) {
  // The first newline after a block tag (and a comment) is dropped; not after {{ }}.
  EXPECT_EQ(render("{% if true %}\nyes\n{% endif %}\nend"), "yes\nend");
  EXPECT_EQ(render("{{ 'x' }}\ny"), "x\ny");
  EXPECT_EQ(render("a{# c #}\nb"), "ab");
  // Only one newline goes.
  EXPECT_EQ(render("{% if true %}\n\nyes{% endif %}"), "\nyes");
  // `+%}` keeps the newline.
  EXPECT_EQ(render("{% if true +%}\nyes{% endif %}"), "\nyes");
}

TEST(ChatTemplateWhitespace, LstripBlocks) {
  // Indentation before a block tag that starts a line is dropped; indentation before {{ }} is not.
  EXPECT_EQ(render("a\n  {% if true %}\n  b\n  {% endif %}\nc"), "a\n  b\nc");
  EXPECT_EQ(render("    {{ 'x' }}"), "    x");
  // Text before the tag on the same line means no stripping.
  EXPECT_EQ(render("a  {% if true %}b{% endif %}"), "a  b");
  EXPECT_EQ(render("{{ 'x' }}  {% if true %}b{% endif %}"), "x  b");
  // `{%+` keeps the indentation.
  EXPECT_EQ(render("a\n  {%+ if true %}b{% endif %}"), "a\n  b");
  // A typical multi-line template reads like the prompt it produces.
  const std::string tmpl =
      "{% for m in messages %}\n"
      "    {% if m.role == 'user' %}\n"
      "User: {{ m.content }}\n"
      "    {% else %}\n"
      "Bot: {{ m.content }}\n"
      "    {% endif %}\n"
      "{% endfor %}\n";
  json ctx = {{"messages", {{{"role", "user"}, {"content", "hi"}}, {{"role", "assistant"}, {"content", "yo"}}}}};
  EXPECT_EQ(render(tmpl, ctx), "User: hi\nBot: yo\n");
}

TEST(ChatTemplateWhitespace, TrailingNewlineAndCrLf) {
  // Jinja drops one trailing newline of the template and reads \r\n as \n.
  EXPECT_EQ(render("hi\n"), "hi");
  EXPECT_EQ(render("hi\n\n"), "hi\n");
  EXPECT_EQ(render("a\r\nb"), "a\nb");
}

// ------------------------------------------------------------------------------------------ render API

TEST(ChatTemplateRender, MessagesAndGenerationPrompt) {
  ChatTemplate tmpl = ChatTemplate::parse(
      "{% for m in messages %}<{{ m.role }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
      "{{ bos_token is defined }}");
  EXPECT_EQ(tmpl.render(kChat, true), "<system>Be brief.<user>Hi<assistant>Hello.<assistant>False");
  EXPECT_EQ(tmpl.render(kChat, false), "<system>Be brief.<user>Hi<assistant>Hello.False");
  // A parsed template is reusable and renders the same way each time.
  EXPECT_EQ(tmpl.render(kChat, false), tmpl.render(kChat, false));
}

// ------------------------------------------------------------------------------------------ errors

TEST(ChatTemplateErrors, RaiseException) {
  const std::string tmpl =
      "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
      "{{ raise_exception('Conversation roles must be user/assistant, got ' + m.role) }}{% endif %}{% endfor %}ok";
  EXPECT_EQ(render(tmpl, {{"messages", {{{"role", "user"}, {"content", "x"}}}}}), "ok");
  std::string msg = error_of(tmpl, {{"messages", {{{"role", "tool"}, {"content", "x"}}}}});
  EXPECT_NE(msg.find("Conversation roles must be user/assistant, got tool"), std::string::npos) << msg;
}

TEST(ChatTemplateErrors, SyntaxErrorsNameTheProblem) {
  auto contains = [](const std::string& msg, const std::string& part) {
    EXPECT_NE(msg.find(part), std::string::npos) << "'" << msg << "' lacks '" << part << "'";
  };
  contains(error_of("{{ 'x'|frobnicate }}"), "unknown filter 'frobnicate'");
  contains(error_of("{{ 'x'|frobnicate }}"), "line 1, column 7");
  contains(error_of("ab\n{% call m() %}{% endcall %}"), "unknown or unsupported tag 'call' at line 2, column 1");
  contains(error_of("{% include 'x.j2' %}"), "unknown or unsupported tag 'include'");
  contains(error_of("{% raw %}{{ x }}{% endraw %}"), "unsupported tag 'raw'");
  contains(error_of("{% for m in messages %}{{ m }}"), "unclosed 'for' block: expected 'endfor' at line 1, column 1");
  contains(error_of("{% if x %}a{% else %}b"), "unclosed 'if' block: expected 'endif'");
  contains(error_of("{% if x %}a{% endfor %}"), "unexpected 'endfor' inside 'if' block");
  contains(error_of("a{% endif %}"), "unexpected 'endif'");
  contains(error_of("{{ x "), "unclosed '{{' tag");
  contains(error_of("{% if x "), "unclosed '{%' tag");
  contains(error_of("{# never closed"), "unclosed comment");
  contains(error_of("{{ 'abc }}"), "unterminated string literal");
  contains(error_of("{{ x is frobbed }}"), "unknown test 'frobbed'");
  contains(error_of("{{ 'x'.zfill(3) }}"), "unknown method 'zfill' on string");
  contains(error_of("{{ 1 + }}"), "expected an expression");
  contains(error_of("{% break %}"), "'break' outside of a for loop");
  contains(error_of("{{ x|tojson(sort=true) }}"), "unexpected keyword argument 'sort'");
  contains(error_of("{{ 'a %s' % 'b' }}"), "'%' string formatting");
  contains(error_of("{% for x in xs recursive %}{% endfor %}"), "'recursive' loop");
  contains(error_of("{{ (1, 2) }}"), "tuple literal");
  contains(error_of("{{ x is none is none }}"), "tests cannot be chained");
}

TEST(ChatTemplateErrors, UndefinedMisuse) {
  // Printing an undefined value is allowed (it prints nothing); using it is not.
  EXPECT_EQ(render("[{{ missing }}][{{ missing|trim }}][{{ missing|default('d') }}]"), "[][][d]");
  EXPECT_NE(error_of("{{ missing.attr }}").find("'missing' is undefined"), std::string::npos);
  EXPECT_NE(error_of("{{ missing + 'a' }}").find("'missing' is undefined"), std::string::npos);
  EXPECT_NE(error_of("{{ nope() }}").find("'nope' is undefined"), std::string::npos);
}

// ------------------------------------------------------------------------------------------ constructs real templates use

TEST(ChatTemplateStmt, Macros) {
  // Defaults, keyword arguments, missing arguments as undefined, recursion, and output as a string.
  EXPECT_EQ(render("{% macro f(x, y='!') %}{{ x }}{{ y }}{% endmacro %}{{ f(1) }}|{{ f(2, y='?') }}|{{ f() }}|{{ f(3)|length }}"),
            "1!|2?|!|2");
  EXPECT_EQ(render("{%- macro t(spec) %}{% if spec.type == 'array' %}list[{{ t(spec['items']) }}]{% else %}{{ spec.type }}"
                   "{% endif %}{% endmacro %}{{ t({'type': 'array', 'items': {'type': 'array', 'items': {'type': 'int'}}}) }}"),
            "list[list[int]]");
  // A macro sees the template's variables (a namespace it can update), not its caller's loop variables.
  EXPECT_EQ(render("{% set ns = namespace(n=0) %}{% macro bump() %}{% set ns.n = ns.n + 1 %}{{ x is defined }}{% endmacro %}"
                   "{% for x in [1, 2] %}{{ bump() }}{% endfor %}{{ ns.n }}"),
            "FalseFalse2");
  EXPECT_NE(error_of("{% macro f(x) %}{% endmacro %}{{ f(1, 2) }}").find("at most 1 arguments"), std::string::npos);
  EXPECT_NE(error_of("{% macro f(x) %}{% endmacro %}{{ f(z=1) }}").find("no parameter 'z'"), std::string::npos);
  EXPECT_NE(error_of("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}").find("recurses too deeply"), std::string::npos);
}

TEST(ChatTemplateExpr, IndentFilter) {
  // Jinja's indent: lines after the first, blank lines left alone.
  EXPECT_EQ(render("{{ 'a\nb\n\nc\n'|indent }}"), "a\n    b\n\n    c\n");
  EXPECT_EQ(render("{{ 'a\nb'|indent(2, first=true) }}|{{ 'a\n\nb'|indent(1, blank=true) }}|{{ 'x\ny'|indent('> ') }}"),
            "  a\n  b|a\n \n b|x\n> y");
}

TEST(ChatTemplateExpr, ToJsonOptions) {
  // HF's tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False).
  json ctx = {{"d", {{"b", "é😀"}, {"a", 1}}}};
  EXPECT_EQ(render("{{ d|tojson(sort_keys=true) }}", ctx), R"({"a": 1, "b": "é😀"})");
  EXPECT_EQ(render("{{ d|tojson(ensure_ascii=true) }}", ctx), R"({"b": "\u00e9\ud83d\ude00", "a": 1})");
  EXPECT_EQ(render("{{ d|tojson(indent=0) }}", ctx), "{\n\"b\": \"é😀\",\n\"a\": 1\n}");
  EXPECT_NE(error_of("{{ d|tojson(separators=[',', ':']) }}", ctx).find("unsupported construct"), std::string::npos);
}

TEST(ChatTemplateExpr, DictGlobalAndMethodAttributes) {
  EXPECT_EQ(render("{{ dict(a=1, b='x') }} {{ dict({'k': 2}, z=3) }}"), "{'a': 1, 'b': 'x'} {'k': 2, 'z': 3}");
  // As in Python, d.items is the dict's method even when a key "items" exists; d['items'] is the key.
  json ctx = {{"d", {{"items", {{"type", "int"}}}}}};
  EXPECT_EQ(render("{{ d.items is defined }} {{ d.items.type is defined }} {{ d['items'].type }}", ctx), "True False int");
}

TEST(ChatTemplateExpr, FilterResultsAreGenerators) {
  // map/select/selectattr return generators in Jinja: always true, no length, not JSON, used up once iterated.
  json ctx = {{"xs", json::array({1, 2, 3})}};
  EXPECT_EQ(render("{% if xs|select('gt', 5) %}T{% endif %}{{ xs|select('gt', 5)|list|length }}", ctx), "T0");
  EXPECT_EQ(render("{% set g = xs|map('string') %}{{ g|join(',') }}|{{ g|join(',') }}|{{ (xs|select('odd'))|first }}", ctx),
            "1,2,3||1");
  EXPECT_NE(error_of("{{ xs|select('odd')|length }}", ctx).find("generator"), std::string::npos);
  EXPECT_NE(error_of("{{ xs|map('string')|tojson }}", ctx).find("not JSON serializable"), std::string::npos);
  EXPECT_NE(error_of("{{ xs|select('odd') }}", ctx).find("unsupported construct"), std::string::npos);
}

TEST(ChatTemplateErrors, HostileTemplatesAreBounded) {
  // Deep nesting, endless loops and exploding strings end in an error, not a crash or a hang.
  EXPECT_NE(error_of("{{ " + std::string(1000, '(') + "1" + std::string(1000, ')') + " }}").find("nested deeper"), std::string::npos);
  EXPECT_NE(error_of("{{ 1" + std::string(5000, '+') + "1 }}").find("nested deeper"), std::string::npos);
  EXPECT_NE(error_of("{{ 'x'" + [] { std::string s; for (int i = 0; i < 2000; i++) s += "|trim"; return s; }() + " }}")
                .find("nested deeper"),
            std::string::npos);
  EXPECT_NE(error_of("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}").find("runs too long"),
            std::string::npos);
  EXPECT_NE(error_of("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}")
                .find("larger than 64 MiB"),
            std::string::npos);
  EXPECT_NE(error_of("{{ 'x' * 100000000000 }}").find("larger than 64 MiB"), std::string::npos);
  EXPECT_NE(error_of("{{ range(10000000000)|length }}").find("a list of more than 500000 items"), std::string::npos);
}

TEST(ChatTemplateErrors, EndlessTemplatesStopInBoundedTimeAndMemory) {
  // Each would run for ever or take gigabytes; each stops within a second.
  EXPECT_NE(error_of("{% for i in range(10**9) %}{% for j in range(10**9) %}x{% endfor %}{% endfor %}").find("a list of more than 500000"),
            std::string::npos);
  EXPECT_NE(error_of("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}").find("runs too long"),
            std::string::npos);
  // A loop body of many expressions is as much work as many iterations.
  EXPECT_NE(error_of("{% for i in range(100000) %}x{{ i }}{{ i }}{{ i }}{{ i }}{{ i }}{% endfor %}")
                .find("runs too long"),
            std::string::npos);
  EXPECT_NE(error_of("{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}").find("recurses too deeply"), std::string::npos);
  EXPECT_NE(error_of("{% macro f(n) %}{% if n %}{% for i in range(100) %}{{ f(n - 1) }}{% endfor %}{% endif %}{% endmacro %}{{ f(5) }}")
                .find("runs too long"),
            std::string::npos);
  // Copying a 60 MB string over and over: too much work long before the loop's end.
  EXPECT_NE(error_of("{% set s = 'x' * 60000000 %}{% for i in range(400000) %}{% set t = s ~ 'y' %}{% endfor %}")
                .find("builds more than 512 MiB"),
            std::string::npos);
  // A list of each character of a 60 MB string would take gigabytes.
  EXPECT_NE(error_of("{{ ('x' * 60000000)|list|length }}").find("a list of more than 500000 items"), std::string::npos);
  EXPECT_NE(error_of("{{ ('x ' * 600000).split()|length }}").find("a list of more than 500000 items"), std::string::npos);
  EXPECT_NE(error_of("{{ [0] * 600000 }}").find("a list of more than 500000 items"), std::string::npos);
}

TEST(ChatTemplateErrors, IntegerOverflowIsAnError) {
  // Python's integers are unbounded, afm's are 64-bit: leaving that range is an error, never a wrapped value.
  for (const char* source : {"{{ 9223372036854775807 + 1 }}", "{{ -9223372036854775807 - 2 }}", "{{ 3037000500 * 3037000500 }}",
                             "{{ 2 ** 63 }}", "{{ 3 ** 9999999999999 }}", "{{ -(-9223372036854775807 - 1) }}",
                             "{{ (-9223372036854775807 - 1)|abs }}", "{{ (-9223372036854775807 - 1) // -1 }}", "{{ (10.0 ** 300)|int }}",
                             "{{ (10.0 ** 400)|int }}"})
    EXPECT_NE(error_of(source).find("integer overflow"), std::string::npos) << source;
  EXPECT_EQ(render("{{ 2 ** 62 }} {{ (-2) ** 63 }} {{ (-9223372036854775807 - 1) % -1 }} {{ (-9223372036854775807 - 1) is divisibleby(-1) }}"),
            "4611686018427387904 -9223372036854775808 0 True");
  EXPECT_NE(error_of("{{ [1].99999999999999999999 }}").find("number literal out of range"), std::string::npos);
  EXPECT_EQ(render("{{ range(9223372036854775806, 9223372036854775807, 5)|list }} {{ [1, 2, 3][1::9223372036854775807] }}"),
            "[9223372036854775806] [2]");
  EXPECT_EQ(render("{{ range(-9223372036854775807 - 1, 9223372036854775807, 9223372036854775807)|list }} {{ range(5, 0, -2)|list }}"),
            "[-9223372036854775808, -1, 9223372036854775806] [5, 3, 1]");
}
