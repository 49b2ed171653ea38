// Loads an npm package of Hugging Face's JavaScript stack for the reference
// generators beside it (tokenizers/make_sp_reference.mjs,
// chat/make_chat_reference.mjs), from NODE_PATH when set (a scratch install
// outside the repository), and reports its version.
import fs from "fs";
import path from "path";
import { createRequire } from "module";

export function loadPackage(name) {
  const require = createRequire(process.env.NODE_PATH ? process.env.NODE_PATH + "/" : import.meta.url);
  const entry = require.resolve(name);
  const root = entry.slice(0, entry.lastIndexOf("/dist/"));
  const version = JSON.parse(fs.readFileSync(path.join(root, "package.json"), "utf8")).version;
  return { module: require(name), version };
}
