// Validates Istio objects (JSON documents, one array on stdin) against
// Istio's CRD schemas as packaged by @kubernetes-models/istio, plus an
// unknown-key check (those schemas accept unknown keys; Istio would reject
// or silently drop them), with the known keys read from the package's own
// TypeScript declarations. Prints one line per problem; exit 1 if any.
//
//   node validate-istio.mjs < docs.json
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const kinds = {
  WasmPlugin: ["extensions.istio.io/v1alpha1", "@kubernetes-models/istio/extensions.istio.io/v1alpha1/WasmPlugin"],
  // Schema only: its declarations nest unions of objects that keyTree cannot
  // follow, and a patch's value is free-form anyway (Envoy's API, not Istio's).
  EnvoyFilter: ["networking.istio.io/v1alpha3", "@kubernetes-models/istio/networking.istio.io/v1alpha3/EnvoyFilter", false],
};

// The key tree of an interface in a .d.ts: {key: subtree | true (leaf or free-form)}.
function keyTree(dts, iface) {
  const body = dts.slice(dts.indexOf(`export interface ${iface} {`));
  const root = {};
  const stack = [root];
  for (const raw of body.split("\n").slice(1)) {
    const line = raw.replace(/\/\*\*.*?\*\//g, "").trim();
    if (line.startsWith("*") || line.startsWith("/**") || line === "") continue;
    const m = line.match(/^"([^"]+)"\??: (.*)$/);
    if (m) {
      const opens = /\{$/.test(m[2]) && !/^\{\}/.test(m[2]);
      const top = stack[stack.length - 1];
      if (opens) { top[m[1]] = {}; stack.push(top[m[1]]); } else { top[m[1]] = true; }
      continue;
    }
    if (/^\[key: string\]/.test(line)) { stack[stack.length - 1]["*"] = true; continue; }
    if (/^\}/.test(line)) { stack.pop(); if (stack.length === 0) break; }
  }
  return root;
}

const META = { name: true, namespace: true, labels: { "*": true }, annotations: { "*": true } };

function unknownKeys(value, tree, path, out) {
  if (tree === true || tree["*"] === true || value === null || typeof value !== "object") return;
  if (Array.isArray(value)) { value.forEach((v, i) => unknownKeys(v, tree, `${path}[${i}]`, out)); return; }
  for (const [k, v] of Object.entries(value)) {
    if (!(k in tree)) { out.push(`${path}.${k}: unknown key (known: ${Object.keys(tree).join(", ")})`); continue; }
    unknownKeys(v, tree[k], `${path}.${k}`, out);
  }
}

const docs = JSON.parse(readFileSync(0, "utf8"));
let problems = 0;
for (const doc of docs) {
  const where = `${doc.kind} ${doc.metadata?.namespace ?? "?"}/${doc.metadata?.name ?? "?"}`;
  const known = kinds[doc.kind];
  if (!known) { console.log(`error: ${where}: no Istio schema for kind ${doc.kind}`); problems++; continue; }
  const { [doc.kind]: Model } = await import(known[1]);
  try {
    new Model(doc).validate();
  } catch (e) {
    console.log(`error: ${where}: ${e.message}`); problems++;
  }
  if (known[2] === false) { if (!problems) console.log(`ok: ${where}`); continue; }
  // Beside this script (no import.meta.resolve: Debian 12's Node 18 lacks it unflagged).
  const dtsPath = join(dirname(fileURLToPath(import.meta.url)), "node_modules", `${known[1]}.d.ts`);
  const tree = keyTree(readFileSync(dtsPath, "utf8"), `I${doc.kind}`);
  tree.metadata = META;
  const out = [];
  unknownKeys(doc, tree, "", out);
  for (const o of out) { console.log(`error: ${where}: ${o}`); problems++; }
  if (!problems) console.log(`ok: ${where}`);
}
process.exit(problems ? 1 : 0);
