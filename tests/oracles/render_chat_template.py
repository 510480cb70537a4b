"""Renders chat templates the way transformers' apply_chat_template does, with jinja2 alone.

The environment is rebuilt from transformers/utils/chat_template_utils.py (not imported: the oracle
runs with only requirements.txt): an ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks,
the loopcontrols extension and the `generation` tag; its tojson (json.dumps, no HTML escaping);
raise_exception, strftime_now, dict and a namespace that refuses underscore names. The render call
passes messages (reasoning copied under every field name), tools, documents, add_generation_prompt
and the extra variables.

Batch use, one process for many cases:
    render_chat_template.py --batch CASES.json --out RESULTS.json
CASES.json is a list of {"template": PATH, "messages": [...], "tools": [...] or null,
"add_generation_prompt": bool, "vars": {...}}; RESULTS.json gets, per case,
{"ok": true, "text": ...} or {"ok": false, "error": ...}.

Single use, with afm template's flags:
    render_chat_template.py --template F.jinja --messages M.json [--tools T.json]
                            [--add-generation-prompt] [--var KEY=JSON]...
"""
import argparse
import json
import sys
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: renders its body (HF uses it to mark assistant tokens)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class TemplateNamespace(jinja2.utils.Namespace):
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"underscore-prefixed namespace attribute {name!r}")


class TemplateDict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)


def make_environment():
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def alias_reasoning(message):
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def render(env, source, messages, tools, add_generation_prompt, variables):
    template = env.from_string(source)
    return template.render(
        messages=[alias_reasoning(m) for m in messages],
        tools=tools,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **variables,
    )


def render_case(env, sources, case):
    path = case["template"]
    if path not in sources:
        with open(path, encoding="utf-8") as f:
            sources[path] = f.read()
    try:
        text = render(env, sources[path], case["messages"], case.get("tools"),
                      case.get("add_generation_prompt", False), case.get("vars", {}))
        return {"ok": True, "text": text}
    except Exception as e:  # any failure is "the template raised"; the test compares that with afm
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch")
    p.add_argument("--out")
    p.add_argument("--template")
    p.add_argument("--messages")
    p.add_argument("--tools")
    p.add_argument("--add-generation-prompt", action="store_true")
    p.add_argument("--var", action="append", default=[])
    args = p.parse_args()
    env, sources = make_environment(), {}
    if args.batch:
        with open(args.batch, encoding="utf-8") as f:
            cases = json.load(f)
        results = [render_case(env, sources, case) for case in cases]
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, ensure_ascii=False)
        return 0
    with open(args.messages, encoding="utf-8") as f:
        messages = json.load(f)
    tools = None
    if args.tools:
        with open(args.tools, encoding="utf-8") as f:
            tools = json.load(f)
    variables = {}
    for var in args.var:
        key, _, value = var.partition("=")
        variables[key] = json.loads(value)
    result = render_case(env, sources, {"template": args.template, "messages": messages, "tools": tools,
                                        "add_generation_prompt": args.add_generation_prompt, "vars": variables})
    if not result["ok"]:
        print(result["error"], file=sys.stderr)
        return 1
    sys.stdout.write(result["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
