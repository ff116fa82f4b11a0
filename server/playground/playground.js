// The micrograd-rpc playground: a thin JSON-RPC client in plain JavaScript.
//
// A program in micrograd's syntax (the seed example's lines) is parsed here into a
// micrograd.v1 Graph node list -- nothing is ever evaluated as code -- and sent to
// POST rpc as JSON-RPC "Evaluate". The operations come from "GetServerInfo": the
// operators + - * / ** and unary minus map to the ops add, sub, mul, div, pow,
// pow_value and neg; any other op with one argument is a method x.name(), one with
// two arguments x.name(y). The answer fills in the output, each input's gradient and
// a layered drawing of the graph with data and grad on every node.
"use strict";

const EXAMPLES = {
  "seed (micrograd's README)": [
    "from micrograd.engine import Value",
    "",
    "a = Value(-4.0)",
    "b = Value(2.0)",
    "c = a + b",
    "d = a * b + b**3",
    "c += c + 1",
    "c += 1 + c + (-a)",
    "d += d * 2 + (b + a).relu()",
    "d += 3 * d + (b - a).relu()",
    "e = c - d",
    "f = e**2",
    "g = f / 2.0",
    "g += 10.0 / f",
    "print(f'{g.data:.4f}')",
    "g.backward()",
  ].join("\n"),
  "one neuron (tanh)": [
    "x1 = Value(2.0)",
    "x2 = Value(0.0)",
    "w1 = Value(-3.0)",
    "w2 = Value(1.0)",
    "b = Value(6.8813735870195432)",
    "n = x1*w1 + x2*w2 + b",
    "o = n.tanh()",
  ].join("\n"),
  "x * 2 + 1, then ReLU": ["x = Value(1.0)", "y = (x * 2 + 1).relu()"].join("\n"),
};

const OPERATORS = { "+": "add", "-": "sub", "*": "mul", "/": "div" };

class ProgramError extends Error {
  constructor(line, message) {
    super(line ? `line ${line}: ${message}` : message);
    this.line = line;
  }
}

// -- tokens ---------------------------------------------------------------

const TOKEN = /\s*(?:(\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|([A-Za-z_]\w*)|(\*\*|[-+*/]=|[-+*/().,=]))/y;

function tokenize(text, line) {
  const tokens = [];
  TOKEN.lastIndex = 0;
  let at = 0;
  while (at < text.length) {
    if (/^\s*$/.test(text.slice(at))) break;
    TOKEN.lastIndex = at;
    const m = TOKEN.exec(text);
    if (!m) {
      const rest = text.slice(at).trim();
      throw new ProgramError(line, `cannot read ${JSON.stringify(rest[0])} (at "${rest}")`);
    }
    at = TOKEN.lastIndex;
    if (m[1] !== undefined) tokens.push({ kind: "num", text: m[1], value: Number(m[1]) });
    else if (m[2] !== undefined) tokens.push({ kind: "name", text: m[2] });
    else tokens.push({ kind: "op", text: m[3] });
  }
  return tokens;
}

// -- the program as a node list --------------------------------------------

// Parse `text` into {nodes, inputs: [{name, node}], output, outputName} using the
// server's op table `ops` (GetServerInfo's "ops": [{op, name, arity, usesValue}]).
function parseProgram(text, ops) {
  const byName = new Map(ops.map((op) => [op.name, op]));
  const nodes = [];
  const lines = []; // the program line of each node, to place the service's errors
  const inputs = [];
  const vars = new Map();
  let lastAssigned = null;

  function need(name, line) {
    const op = byName.get(name);
    if (!op) throw new ProgramError(line, `this server has no op ${JSON.stringify(name)}`);
    return op;
  }
  function node(opName, args, value, line) {
    const op = need(opName, line);
    const n = { op: op.op };
    if (args.length) n.args = args;
    if (value !== undefined) n.value = value;
    nodes.push(n);
    lines.push(line);
    return { kind: "node", index: nodes.length - 1 };
  }
  function asNode(x, line) {
    return x.kind === "node" ? x.index : node("const", [], x.value, line).index;
  }
  function binary(symbol, x, y, line) {
    if (x.kind === "num" && y.kind === "num") {
      const v = { "+": x.value + y.value, "-": x.value - y.value, "*": x.value * y.value,
        "/": x.value / y.value, "**": x.value ** y.value }[symbol];
      return { kind: "num", value: v };
    }
    if (symbol === "**") {
      if (y.kind === "num") return node("pow", [x.index], y.value, line);
      return node("pow_value", [asNode(x, line), y.index], undefined, line);
    }
    return node(OPERATORS[symbol], [asNode(x, line), asNode(y, line)], undefined, line);
  }

  function parseLine(tokens, line, target) {
    let pos = 0;
    const peek = () => tokens[pos];
    const isOp = (t) => peek() && peek().kind === "op" && peek().text === t;
    function expect(t) {
      if (!isOp(t)) {
        const got = peek() ? JSON.stringify(peek().text) : "the end of the line";
        throw new ProgramError(line, `expected ${JSON.stringify(t)}, got ${got}`);
      }
      pos++;
    }
    function expr() {
      let x = term();
      while (isOp("+") || isOp("-")) {
        const s = tokens[pos++].text;
        x = binary(s, x, term(), line);
      }
      return x;
    }
    function term() {
      let x = unary();
      while (isOp("*") || isOp("/")) {
        const s = tokens[pos++].text;
        x = binary(s, x, unary(), line);
      }
      return x;
    }
    function unary() {
      if (isOp("-")) {
        pos++;
        const x = unary();
        return x.kind === "num" ? { kind: "num", value: -x.value } : node("neg", [x.index], undefined, line);
      }
      if (isOp("+")) { pos++; return unary(); }
      const base = postfix();
      if (isOp("**")) { pos++; return binary("**", base, unary(), line); }
      return base;
    }
    function postfix() {
      let x = atom();
      while (isOp(".")) {
        pos++;
        const t = tokens[pos++];
        if (!t || t.kind !== "name") throw new ProgramError(line, "expected a method name after '.'");
        const op = byName.get(t.text);
        if (op && (op.arity < 1 || ["input", "const"].includes(op.name))) {
          throw new ProgramError(line, `${t.text} is not a method of Value`);
        }
        expect("(");
        const args = [asNode(x, line)];
        if (!isOp(")")) args.push(asNode(expr(), line));
        expect(")");
        if (!op) {
          // Not in this server's op table: send it anyway, so the service says what it knows.
          nodes.push({ op: `OP_${t.text.toUpperCase()}`, args });
          lines.push(line);
          x = { kind: "node", index: nodes.length - 1 };
          continue;
        }
        if (args.length !== op.arity) {
          throw new ProgramError(line, `${t.text}() takes ${op.arity - 1} argument(s), got ${args.length - 1}`);
        }
        x = node(op.name, args, undefined, line);
      }
      return x;
    }
    function atom() {
      const t = tokens[pos++];
      if (!t) throw new ProgramError(line, "the line ends where a value was expected");
      if (t.kind === "num") return { kind: "num", value: t.value };
      if (t.kind === "op" && t.text === "(") {
        const x = expr();
        expect(")");
        return x;
      }
      if (t.kind === "name" && t.text === "Value") {
        expect("(");
        const v = expr();
        expect(")");
        if (v.kind !== "num") throw new ProgramError(line, "Value(...) takes a number");
        const made = node("input", [], v.value, line);
        inputs.push({ name: target, node: made.index, value: v.value });
        return made;
      }
      if (t.kind === "name") {
        if (!vars.has(t.text)) throw new ProgramError(line, `name ${JSON.stringify(t.text)} is not defined`);
        return vars.get(t.text);
      }
      throw new ProgramError(line, `unexpected ${JSON.stringify(t.text)}`);
    }
    const x = expr();
    if (pos < tokens.length) throw new ProgramError(line, `unexpected ${JSON.stringify(tokens[pos].text)}`);
    return x;
  }

  text.split("\n").forEach((raw, i) => {
    const line = i + 1;
    const code = raw.replace(/#.*$/, "").trim();
    if (!code || /^(from|import)\s/.test(code) || /^print\s*\(/.test(code) ||
        /^\w+\.backward\(\)$/.test(code)) return;
    const tokens = tokenize(code, line);
    const [name, assign] = tokens;
    if (!name || name.kind !== "name" || !assign || assign.kind !== "op" ||
        !["=", "+=", "-=", "*=", "/="].includes(assign.text)) {
      throw new ProgramError(line, "expected an assignment such as  c = a + b  or  c += 1");
    }
    if (assign.text !== "=" && !vars.has(name.text)) {
      throw new ProgramError(line, `name ${JSON.stringify(name.text)} is not defined`);
    }
    let x = parseLine(tokens.slice(2), line, name.text);
    if (assign.text !== "=") x = binary(assign.text[0], vars.get(name.text), x, line);
    vars.set(name.text, x);
    lastAssigned = { name: name.text, line };
  });
  if (!lastAssigned) throw new ProgramError(0, "the program assigns nothing: write e.g.  a = Value(2.0)");
  const out = vars.get(lastAssigned.name);
  if (out.kind !== "node") {
    throw new ProgramError(lastAssigned.line, `${lastAssigned.name} is a plain number, not a Value`);
  }
  const seen = new Set();
  for (const input of inputs) {
    if (!seen.has(input.name)) { nodes[input.node].name = input.name; seen.add(input.name); }
  }
  if (nodes[out.index].name === undefined) nodes[out.index].name = lastAssigned.name;
  return { nodes, lines, inputs: inputs.filter((x) => nodes[x.node].name === x.name),
    output: out.index, outputName: lastAssigned.name };
}

// -- JSON-RPC --------------------------------------------------------------

let nextId = 1;
function authHeaders() {
  const token = new URLSearchParams(location.search).get("token") ||
    new URLSearchParams(location.hash.slice(1)).get("token");
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function call(method, params) {
  const response = await fetch("rpc", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify({ jsonrpc: "2.0", id: nextId++, method, params }),
  });
  const text = await response.text();
  let body;
  try { body = JSON.parse(text); } catch (e) {
    throw new Error(`HTTP ${response.status}: ${text.trim()}`);
  }
  if (body.error) {
    const data = body.error.data || {};
    const fields = (data.violations || data.fieldViolations || [])
      .map((v) => `${v.field}: ${v.description}`).join("; ");
    throw new Error(`${body.error.message}${fields && !body.error.message.includes(fields) ? ` (${fields})` : ""}`);
  }
  return body.result;
}

// -- drawing ---------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
function el(name, attrs, text) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(x) {
  if (typeof x === "string") return x; // "NaN", "Infinity"
  return x.toFixed(4);
}

// A layered drawing: each node's column is one past its deepest argument (inputs in
// column 0, constants just before their first user); op nodes sit left of their value.
function drawGraph(program, result, opNames, labels) {
  const nodes = program.nodes;
  const layer = new Array(nodes.length).fill(0);
  const isConst = (n) => opNames.get(n.op) === "const";
  nodes.forEach((n, i) => {
    for (const a of n.args || []) layer[i] = Math.max(layer[i], layer[a] + (isConst(nodes[a]) ? 0 : 1));
  });
  // Constants sit one column before their first user, not all in column 0.
  nodes.forEach((n, i) => {
    if (!isConst(n)) return;
    let first = Infinity;
    nodes.forEach((m, j) => { if ((m.args || []).includes(i)) first = Math.min(first, layer[j]); });
    layer[i] = Number.isFinite(first) ? Math.max(0, first - 1) : 0;
  });
  const rows = [];
  layer.forEach((l, i) => { (rows[l] = rows[l] || []).push(i); });
  const W = 150, H = 46, COL = 230, ROW = 62, OPX = 48, LEFT = 20 + OPX + 20;
  const pos = [];
  rows.forEach((col, l) => col.forEach((i, r) => { pos[i] = { x: LEFT + l * COL, y: 12 + r * ROW }; }));
  const width = LEFT + rows.length * COL;
  const height = 24 + Math.max(...rows.map((c) => c.length)) * ROW;
  const svg = el("svg", { xmlns: SVG, width, height, viewBox: `0 0 ${width} ${height}` });
  const edges = el("g", {});
  svg.appendChild(edges);
  const byIndex = new Map(result.nodes.map((n, j) => [n, j]));
  nodes.forEach((n, i) => {
    const { x, y } = pos[i];
    const j = byIndex.get(i);
    const data = j === undefined ? "?" : fmt(result.values[j]);
    const grad = j === undefined || !result.grads.length ? "?" : fmt(result.grads[j]);
    const op = opNames.get(n.op) || n.op;
    const cls = ["value"];
    if (op === "input") cls.push("input");
    if (i === result.output) cls.push("output");
    const g = el("g", { class: cls.join(" "), "data-node": i });
    g.appendChild(el("rect", { x, y, width: W, height: H, rx: 4 }));
    g.appendChild(el("text", { x: x + 6, y: y + 14 }, n.name ? `${n.name} (${op})` : op));
    g.appendChild(el("text", { x: x + 6, y: y + 28, class: "data" }, `data ${data}`));
    g.appendChild(el("text", { x: x + 6, y: y + 41, class: "grad" }, `grad ${grad}`));
    svg.appendChild(g);
    if (n.args && n.args.length) {
      const cx = x - OPX / 2 - 8, cy = y + H / 2;
      const label = labels[op] || op;
      const o = el("g", { class: "opnode" });
      o.appendChild(el("ellipse", { cx, cy, rx: OPX / 2, ry: 13 }));
      o.appendChild(el("text", { x: cx, y: cy + 4, "text-anchor": "middle" },
        op === "pow" ? `**${n.value}` : label));
      svg.appendChild(o);
      edges.appendChild(el("line", { x1: cx + OPX / 2, y1: cy, x2: x, y2: cy, class: "edge" }));
      for (const a of n.args) {
        const p = pos[a];
        edges.appendChild(el("path", {
          d: `M ${p.x + W} ${p.y + H / 2} C ${p.x + W + 40} ${p.y + H / 2}, ${cx - OPX / 2 - 40} ${cy}, ${cx - OPX / 2} ${cy}`,
          class: "edge",
        }));
      }
    }
  });
  return svg;
}

// -- the page --------------------------------------------------------------

const LABELS = { add: "+", sub: "-", mul: "*", div: "/", neg: "-x", pow_value: "**", relu: "ReLU" };

const state = { ops: null, program: null, overrides: {} };
const $ = (id) => document.getElementById(id);

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  $("status").textContent = "error";
}

function renderInputs(program, result) {
  const body = $("inputs").querySelector("tbody");
  body.textContent = "";
  for (const input of program.inputs) {
    const j = result.names[input.name];
    const tr = document.createElement("tr");
    tr.dataset.input = input.name;
    const name = document.createElement("td");
    name.textContent = input.name;
    const valueCell = document.createElement("td");
    const box = document.createElement("input");
    box.type = "number";
    box.step = "any";
    box.name = input.name;
    box.value = String(input.name in state.overrides ? state.overrides[input.name] : input.value);
    box.addEventListener("change", () => {
      const v = Number(box.value);
      if (box.value.trim() === "" || !Number.isFinite(v)) {
        showError(`input ${input.name}: ${JSON.stringify(box.value)} is not a number`);
        return;
      }
      state.overrides[input.name] = v;
      evaluate(false);
    });
    valueCell.appendChild(box);
    const grad = document.createElement("td");
    grad.className = "grad";
    grad.textContent = j === undefined ? "?" : fmt(result.grads[j]);
    tr.append(name, valueCell, grad);
    body.appendChild(tr);
  }
}

async function evaluate(reparse) {
  $("error").hidden = true;
  $("status").textContent = "evaluating...";
  try {
    if (!state.ops) state.ops = (await call("GetServerInfo", {})).ops;
    if (reparse || !state.program) {
      state.program = null;
      state.program = parseProgram($("program").value, state.ops);
      state.overrides = {};
    }
    const program = state.program;
    const inputs = {};
    for (const [name, v] of Object.entries(state.overrides)) inputs[name] = v;
    const params = { graph: { nodes: program.nodes }, output: program.output,
      selection: "SELECTION_ALL" };
    if (Object.keys(inputs).length) params.inputs = inputs;
    const result = await call("Evaluate", params);
    if (!result.nodes || !result.nodes.length) result.nodes = program.nodes.map((_, i) => i);
    result.grads = result.grads || [];
    result.names = result.names || {};
    result.output = result.output || 0;
    const out = result.nodes.indexOf(result.output);
    $("output-name").textContent = program.outputName;
    $("output-value").textContent = fmt(result.values[out]);
    renderInputs(program, result);
    const opNames = new Map(state.ops.map((o) => [o.op, o.name]));
    const picture = $("graph");
    picture.textContent = "";
    picture.appendChild(drawGraph(program, result, opNames, LABELS));
    $("status").textContent = `${program.nodes.length} nodes evaluated by the service`;
  } catch (err) {
    const at = /nodes\[(\d+)\]/.exec(err.message) || /node (\d+)/.exec(err.message);
    const line = at && state.program && !(err instanceof ProgramError) ?
      state.program.lines[Number(at[1])] : undefined;
    showError(line ? `line ${line}: ${err.message}` : err.message);
  }
}

function start() {
  const select = $("example");
  for (const name of Object.keys(EXAMPLES)) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    select.appendChild(option);
  }
  select.addEventListener("change", () => {
    $("program").value = EXAMPLES[select.value];
    evaluate(true);
  });
  $("program").value = EXAMPLES[select.value];
  $("evaluate").addEventListener("click", () => evaluate(true));
  evaluate(true);
}

if (typeof document !== "undefined") start();
if (typeof module !== "undefined") module.exports = { parseProgram, tokenize, EXAMPLES };
