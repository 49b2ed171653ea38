// Writes chat_reference.json: what Hugging Face's own Jinja implementation
// (@huggingface/jinja, the one transformers.js renders chat templates with)
// makes of each published template in templates.json for a set of
// conversations, with and without add_generation_prompt. A template that
// raises (raise_exception) is recorded as {"error": message}.
// edge::FormatChat re-implements these templates; chat_template_test.cc
// compares it with this file.
//
//   npm install --prefix /tmp/hfjs @huggingface/jinja@0.5.13
//   NODE_PATH=/tmp/hfjs/node_modules node tests/data/chat/make_chat_reference.mjs
import fs from "fs";
import path from "path";
import { fileURLToPath } from "url";

import { loadPackage } from "../hfjs.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const { module: { Template }, version } = loadPackage("@huggingface/jinja");

const m = (role, content) => ({ role, content });
const conversations = [
  [m("user", "Hi")],
  [m("system", "Be brief."), m("user", "Hi"), m("assistant", "Hello!"), m("user", "Bye ")],
  [m("user", "  spaced  "), m("assistant", " reply ")],
  [m("user", "multi\nline\n"), m("assistant", "ok"), m("user", "é 日本 😀")],
  [m("system", "Only a system turn")],
  [m("user", "Hi"), m("user", "again")],
  [m("assistant", "I speak first")],
  [m("user", "Hi"), m("tool", "{\"x\": 1}")],
  [],
];

const { templates } = JSON.parse(fs.readFileSync(path.join(here, "templates.json"), "utf8"));
const results = {};
for (const [key, t] of Object.entries(templates)) {
  const tmpl = new Template(t.template);
  results[key] = [];
  for (const messages of conversations) {
    for (const add_generation_prompt of [false, true]) {
      const entry = { messages, add_generation_prompt };
      try {
        entry.text = tmpl.render({
          messages,
          add_generation_prompt,
          bos_token: t.bos_token,
          eos_token: t.eos_token,
        });  // raise_exception is built into @huggingface/jinja
      } catch (e) {
        entry.error = String(e.message);
      }
      results[key].push(entry);
    }
  }
}
const out = { generator: `@huggingface/jinja ${version} (tests/data/chat/make_chat_reference.mjs)`, results };
fs.writeFileSync(path.join(here, "chat_reference.json"), JSON.stringify(out, null, 1) + "\n");
console.log("wrote chat_reference.json:", Object.keys(results).length, "templates x", conversations.length * 2, "renders");
