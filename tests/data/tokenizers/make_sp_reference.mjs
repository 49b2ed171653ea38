// Writes sp_bpe_reference.json: the ids and decoded text that Hugging Face's
// tokenizers.js (@huggingface/tokenizers, a reference implementation of
// tokenizer.json kept by Hugging Face beside the Rust `tokenizers` crate) gives
// for sp_bpe_tokenizer.json and variants of it (the Metaspace layout of newer
// Llama/Mistral files, with its own decoder or the byte-fallback decoder chain,
// and no byte fallback). tokenizer_test.cc makes the same edits. The Python stack is not
// available here; tokenizers.js agrees with it on every case of the golden
// tok-bytelevel fixture (checked below before anything is written).
//
//   npm install --prefix /tmp/hfjs @huggingface/tokenizers@0.2.0
//   NODE_PATH=/tmp/hfjs/node_modules node tests/data/tokenizers/make_sp_reference.mjs
import fs from "fs";
import path from "path";
import { fileURLToPath } from "url";

import { loadPackage } from "../hfjs.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const { module: { Tokenizer }, version } = loadPackage("@huggingface/tokenizers");

const read = (p) => JSON.parse(fs.readFileSync(p, "utf8"));
const decode = (tok, ids, skip) => (ids.length ? tok.decode(ids, { skip_special_tokens: skip }) : "");

// 1. tokenizers.js against the Python-made golden cases.
const golden = path.join(here, "../fixtures/hf/tok-bytelevel");
const bl = new Tokenizer(read(golden + "/tokenizer.json"), {});
for (const c of read(golden + "/cases.json").cases) {
  const ids = bl.encode(c.text, { add_special_tokens: false }).ids;
  if (JSON.stringify(ids) !== JSON.stringify(c.ids) || decode(bl, c.ids, false) !== c.decoded) {
    throw new Error("tokenizers.js disagrees with the Python fixture on " + JSON.stringify(c.text));
  }
}

// 2. The SentencePiece-style tokenizer and its variants.
const base = read(path.join(here, "sp_bpe_tokenizer.json"));
const metaspace = structuredClone(base);
metaspace.normalizer = null;
const ms = { type: "Metaspace", replacement: "\u2581", prepend_scheme: "first", split: false };
metaspace.pre_tokenizer = ms;
metaspace.decoder = ms;
// Metaspace pre-tokenizer with the byte-fallback decoder chain kept.
const metaspace_bytes = structuredClone(metaspace);
metaspace_bytes.decoder = base.decoder;
const nofallback = structuredClone(base);
nofallback.model.byte_fallback = false;

const texts = [
  "hello world", "héllo", "<s>hello</s>", "  test", " ", "\n", "", "x",
  "hello  world  ", "tab\tnew\nline", "ünïcödé 日本 😀", "€", "<s> hello",
  "hello</s>world", "the test of tests", "llo ll l", "worldworld", "a\u00a0b",
  "\r\n", "<unk>", "hé€llo", "   leading and trailing   ", "ẞ\u0301",
];
const variants = {};
for (const [name, json] of Object.entries({
  normalizer: base,
  metaspace,
  metaspace_byte_fallback_decoder: metaspace_bytes,
  no_byte_fallback: nofallback,
})) {
  const tok = new Tokenizer(json, {});
  variants[name] = texts.map((text) => {
    const ids = tok.encode(text, { add_special_tokens: false }).ids;
    return { text, ids, decoded: decode(tok, ids, false), decoded_skip_special: decode(tok, ids, true) };
  });
}
const out = {
  generator: `@huggingface/tokenizers ${version} (tests/data/tokenizers/make_sp_reference.mjs)`,
  tokenizer: "sp_bpe_tokenizer.json",
  variants,
};
fs.writeFileSync(path.join(here, "sp_bpe_reference.json"), JSON.stringify(out, null, 1) + "\n");
console.log("wrote sp_bpe_reference.json:", Object.keys(variants).length, "variants x", texts.length, "texts");
