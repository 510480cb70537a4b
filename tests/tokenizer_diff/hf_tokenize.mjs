// Reference side of the tokenizer differential test and benchmark: runs the npm
// @huggingface/tokenizers package (a pure-JS port of HF tokenizers) on the same inputs as afm.
//
//   node hf_tokenize.mjs encode <tokenizer_dir> <texts.json> <out.json>
//       texts.json: a JSON array of strings; writes a JSON array with the ids of each one
//       (add_special_tokens = false).
//   node hf_tokenize.mjs bench <tokenizer_dir> <corpus.txt>
//       encodes the corpus paragraph by paragraph and prints "tokens=N seconds=S".
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Tokenizer } from "@huggingface/tokenizers";

const [mode, dir, input, output] = process.argv.slice(2);
const readJson = (path) => JSON.parse(readFileSync(path, "utf8"));
const tokenizer = new Tokenizer(readJson(join(dir, "tokenizer.json")),
                                readJson(join(dir, "tokenizer_config.json")));
const encode = (text) => tokenizer.encode(text, { add_special_tokens: false }).ids;

if (mode === "encode") {
  const ids = readJson(input).map(encode);
  writeFileSync(output, JSON.stringify(ids));
} else if (mode === "bench") {
  // Same split as bench_tokenizer.cpp, so both sides encode identical pieces.
  const paragraphs = readFileSync(input, "utf8").split("\n\n");
  const start = process.hrtime.bigint();
  let tokens = 0;
  for (const p of paragraphs) tokens += encode(p).length;
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  console.log(`tokens=${tokens} seconds=${seconds.toFixed(4)}`);
} else {
  console.error("usage: hf_tokenize.mjs encode <dir> <texts.json> <out.json> | bench <dir> <corpus.txt>");
  process.exit(2);
}
