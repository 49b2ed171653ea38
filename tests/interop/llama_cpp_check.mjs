#!/usr/bin/env node
// Loads a GGUF model (and optionally GGUF LoRA adapters) with llama.cpp through
// the @fugood/llama.node binding, and greedy-decodes N tokens.
//
//   node tests/interop/llama_cpp_check.mjs --model M.gguf [--lora A.gguf [--lora-scale 1]]
//        (--ids 50,278,... | --prompt "text") [--n 12] [--threads 1] [--n-probs 5]
//
// The binding resolves from $FEDLORA_INTEROP_DIR/node_modules (default
// <repo>/build/interop; scripts/interop-deps.sh installs it there).
//
// Prints one JSON object on stdout, on a line starting "FEDLORA_LLAMA_CPP_RESULT ":
//   {"prompt_text": ..., "prompt_ids": [...],   // llama.cpp's tokenization of the prompt
//    "pieces": [...],                           // one string per generated token, as
//                                               // llama.cpp's server formats it ("byte: \xNN"
//                                               // for a lone high byte)
//    "first_top": [[piece, prob], ...],         // the --n-probs most likely next tokens
//                                               // after the prompt, with probabilities
//    "text": ..., "tokens_predicted": as the binding counts them}
// Exits non-zero, with the reason on stderr, if llama.cpp refuses a file or
// anything else fails.

import { createRequire } from 'node:module';
import path from 'node:path';
import process from 'node:process';
import { fileURLToPath } from 'node:url';

function parseArgs(argv) {
  const args = { lora: [], loraScale: 1.0, n: 12, threads: 1, nProbs: 5 };
  for (let i = 0; i < argv.length; ++i) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) throw new Error(`missing value after ${a}`);
      return argv[++i];
    };
    if (a === '--model') args.model = next();
    else if (a === '--lora') args.lora.push(next());
    else if (a === '--lora-scale') args.loraScale = Number(next());
    else if (a === '--ids') args.ids = next().split(',').filter((s) => s.length > 0).map(Number);
    else if (a === '--prompt') args.prompt = next();
    else if (a === '--n') args.n = Number(next());
    else if (a === '--threads') args.threads = Number(next());
    else if (a === '--n-probs') args.nProbs = Math.max(1, Number(next()));
    else throw new Error(`unknown argument ${a}`);
  }
  if (!args.model) throw new Error('--model is required');
  if (args.ids === undefined && args.prompt === undefined) throw new Error('--ids or --prompt is required');
  return args;
}

// @fugood/llama.node 1.7.x can resolve a completion's promise before it marks
// the context free again: a completion started right after it then fails with
// "Another completion is in progress" (seen once in a CI run). Such a call is
// retried after a short wait, for up to a second.
async function completion(ctx, params) {
  for (let attempt = 0; ; ++attempt) {
    try {
      return await ctx.completion(params);
    } catch (e) {
      const busy = String(e && e.message ? e.message : e).includes('Another completion is in progress');
      if (!busy || attempt >= 50) throw e;
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const here = path.dirname(fileURLToPath(import.meta.url));
  const interopDir = process.env.FEDLORA_INTEROP_DIR || path.resolve(here, '../../build/interop');
  const require = createRequire(path.join(interopDir, 'node_modules', 'noop.js'));
  let llama;
  try {
    llama = require('@fugood/llama.node');
  } catch (e) {
    throw new Error(`cannot load @fugood/llama.node from ${interopDir}/node_modules ` +
                    `(run scripts/interop-deps.sh): ${e.message}`);
  }

  const options = {
    model: args.model,
    n_ctx: 256,
    n_batch: 256,
    n_threads: args.threads,
    n_gpu_layers: 0,
    use_mmap: false,
  };
  if (args.lora.length > 0) {
    options.lora_list = args.lora.map((p) => ({ path: p, scaled: args.loraScale }));
  }
  const ctx = await llama.loadModel(options);
  {
    if (args.lora.length > 0) {
      const loaded = ctx.getLoadedLoraAdapters();
      if (!Array.isArray(loaded) || loaded.length !== args.lora.length) {
        throw new Error(`llama.cpp loaded ${JSON.stringify(loaded)} of ${args.lora.length} LoRA adapters`);
      }
    }
    const promptText = args.prompt !== undefined ? args.prompt : await ctx.detokenize(args.ids);
    const tok = await ctx.tokenize(promptText);
    const promptIds = Array.from(tok.tokens);
    const result = await completion(ctx, {
      prompt: promptText,
      n_predict: args.n,
      temperature: 0,
      top_k: 1,
      top_p: 1,
      min_p: 0,
      penalty_last_n: 0,
      penalty_repeat: 1,
      penalty_freq: 0,
      penalty_present: 0,
      dry_multiplier: 0,
      xtc_probability: 0,
      ignore_eos: true,
      n_probs: args.nProbs,
      seed: 0,
    });
    // The binding appends to one per-context list across completions: keep the
    // entries of this call only.
    const probs = (result.completion_probabilities || []).slice(-args.n);
    // Greedy sampling reports only the chosen token (prob 1). For the model's
    // real next-token distribution after the prompt, sample one token at
    // temperature 1 with every truncation off and read its candidates.
    const probe = await completion(ctx, {
      prompt: promptText,
      n_predict: 1,
      temperature: 1,
      top_k: 0,
      top_p: 1,
      min_p: 0,
      typ_p: 1,
      penalty_last_n: 0,
      penalty_repeat: 1,
      dry_multiplier: 0,
      xtc_probability: 0,
      n_probs: args.nProbs,
      seed: 1,
    });
    const first = (probe.completion_probabilities || []).slice(-1)[0];
    const out = {
      prompt_text: promptText,
      prompt_ids: promptIds,
      pieces: probs.map((p) => p.content),
      first_top: first ? first.probs.map((q) => [q.tok_str, q.prob]) : [],
      text: result.text,
      tokens_predicted: result.tokens_predicted,
    };
    // llama.cpp's native log also goes to stdout: mark the result line.
    process.stdout.write('\nFEDLORA_LLAMA_CPP_RESULT ' + JSON.stringify(out) + '\n');
  }
  // No ctx.release(): the binding (1.7.15) segfaults in about one teardown of
  // ten after the work is done; the process exits right away instead.
}

main().then(() => {
  process.stdout.write('', () => process.exit(0));
}).catch((e) => {
  process.stderr.write(`llama_cpp_check: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
