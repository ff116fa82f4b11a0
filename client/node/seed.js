#!/usr/bin/env node
// The seed example over gRPC from Node.js: builds the graph of
//   g = f(a, b) with a = -4, b = 2
// as a micrograd.v1.Graph node list, calls GradientService.Evaluate and prints
// g, dg/da and dg/db to 4 decimals (24.7041, 138.8338, 645.5773).
//
// Usage: node client/node/seed.js [host:port]
//   (or MICROGRAD_RPC_TARGET=host:port; default 127.0.0.1:50051)
// Security, from the environment (as for `micrograd-rpc eval`):
//   MICROGRAD_RPC_TLS_CA=ca.pem       connect over TLS, trusting that CA (MICROGRAD_RPC_TLS=1:
//                                     TLS with the system's roots)
//   MICROGRAD_RPC_TLS_CLIENT_CERT=client.pem MICROGRAD_RPC_TLS_CLIENT_KEY=client.key
//                                     a client certificate, for servers that require one
//   MICROGRAD_RPC_TOKEN=...           sent as `authorization: Bearer <token>` with the call
// The schema is read from the repository's proto/ folder at run time.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');

// Loads micrograd.v1 from the .proto files; enums as their names, 64-bit ints as strings.
function loadService() {
  const definition = protoLoader.loadSync('micrograd/v1/gradient_service.proto', {
    includeDirs: [PROTO_ROOT],
    enums: String,
    longs: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).micrograd.v1.GradientService;
}

// A graph under construction: every method appends one node and returns its index,
// so arguments always refer to earlier nodes.
class GraphBuilder {
  constructor() {
    this.nodes = [];
  }

  node(op, args = [], value = 0, name = '') {
    this.nodes.push({ op, args, value, name });
    return this.nodes.length - 1;
  }

  input(name, value) { return this.node('OP_INPUT', [], value, name); }
  constant(value) { return this.node('OP_CONST', [], value); }
  add(x, y) { return this.node('OP_ADD', [x, y]); }
  sub(x, y) { return this.node('OP_SUB', [x, y]); }
  mul(x, y) { return this.node('OP_MUL', [x, y]); }
  div(x, y) { return this.node('OP_DIV', [x, y]); }
  neg(x) { return this.node('OP_NEG', [x]); }
  pow(x, exponent) { return this.node('OP_POW', [x], exponent); }
  relu(x) { return this.node('OP_RELU', [x]); }
}

// The seed's expression, line by line (`c += t` becomes `c = c + t`).
function seedGraph() {
  const G = new GraphBuilder();
  const k = (v) => G.constant(v);
  const a = G.input('a', -4.0);
  const b = G.input('b', 2.0);
  let c = G.add(a, b);
  let d = G.add(G.mul(a, b), G.pow(b, 3));
  c = G.add(c, G.add(c, k(1)));
  c = G.add(c, G.add(G.add(k(1), c), G.neg(a)));
  d = G.add(d, G.add(G.mul(d, k(2)), G.relu(G.add(b, a))));
  d = G.add(d, G.add(G.mul(k(3), d), G.relu(G.sub(b, a))));
  const e = G.sub(c, d);
  const f = G.pow(e, 2);
  let g = G.div(f, k(2.0));
  g = G.add(g, G.div(k(10.0), f));
  return { graph: { nodes: G.nodes }, a, b, g };
}

// Channel credentials from the environment: TLS (optionally with a client certificate) or none.
function credentials(env) {
  const read = (name) => (env[name] ? fs.readFileSync(env[name]) : null);
  const ca = read('MICROGRAD_RPC_TLS_CA');
  const cert = read('MICROGRAD_RPC_TLS_CLIENT_CERT');
  const key = read('MICROGRAD_RPC_TLS_CLIENT_KEY');
  if (!ca && !cert && !['1', 'true', 'yes'].includes((env.MICROGRAD_RPC_TLS || '').toLowerCase())) {
    return grpc.credentials.createInsecure();
  }
  return grpc.credentials.createSsl(ca, key, cert);
}

// Call metadata: the bearer token, when one is set.
function metadata(env) {
  const md = new grpc.Metadata();
  const token = (env.MICROGRAD_RPC_TOKEN || '').trim();
  if (token) md.add('authorization', `Bearer ${token}`);
  return md;
}

function main() {
  const env = process.env;
  const target = process.argv[2] || env.MICROGRAD_RPC_TARGET || '127.0.0.1:50051';
  const GradientService = loadService();
  const client = new GradientService(target, credentials(env));
  const { graph, a, b, g } = seedGraph();
  const deadline = new Date(Date.now() + 10000);
  client.Evaluate({ graph, output: g }, metadata(env), { deadline }, (err, response) => {
    client.close();
    if (err) {
      console.error(`Evaluate failed: ${err.code} ${err.details || err.message}`);
      process.exitCode = 1;
      return;
    }
    // Every node is reported (the default selection), so entry i is node i.
    console.log(response.values[g].toFixed(4));
    console.log(response.grads[a].toFixed(4));
    console.log(response.grads[b].toFixed(4));
  });
}

main();
