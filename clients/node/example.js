#!/usr/bin/env node
// Custos from Node.js: GenerateDataKey, then Decrypt, over mutual TLS.
//
// Loads the API from proto/ at run time with @grpc/proto-loader, asks
// custosd for a data key under --key-name with the given encryption context,
// decrypts the blob with the same context, and checks that both plaintexts
// match. Prints one JSON line: {"key_id": ..., "key_version": ..., "ok": true}.
// The data key itself is never printed. See README.md.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');

const PROG = 'example.js';

function fail(message) {
  process.stderr.write(`${PROG}: ${message}\n`);
  process.exit(1);
}

function usage() {
  return `usage: node ${PROG} --key-name KEY [--context K=V]... ` +
    '[--addr HOST:PORT] [--ca PEM] [--cert PEM] [--key PEM] ' +
    '[--proto-dir DIR] [--timeout SECONDS]\n' +
    '  --addr, --ca, --cert and --key default to $CUSTOS_ADDR, $CUSTOS_CA,\n' +
    '  $CUSTOS_CERT and $CUSTOS_KEY (scripts/dev-env writes env.sh with them).\n' +
    '  Dial a host name the server certificate names (localhost), not an IP.\n';
}

function parse() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        addr: { type: 'string', default: process.env.CUSTOS_ADDR },
        ca: { type: 'string', default: process.env.CUSTOS_CA },
        cert: { type: 'string', default: process.env.CUSTOS_CERT },
        key: { type: 'string', default: process.env.CUSTOS_KEY },
        'key-name': { type: 'string' },
        context: { type: 'string', multiple: true, default: [] },
        'proto-dir': {
          type: 'string',
          default: path.join(__dirname, '..', '..', 'proto'),
        },
        timeout: { type: 'string', default: '10' },
        help: { type: 'boolean', short: 'h', default: false },
      },
    }));
  } catch (e) {
    process.stderr.write(`${PROG}: ${e.message}\n${usage()}`);
    process.exit(2);
  }
  if (values.help) {
    process.stdout.write(usage());
    process.exit(0);
  }
  for (const name of ['addr', 'ca', 'cert', 'key', 'key-name']) {
    if (!values[name]) {
      process.stderr.write(`${PROG}: --${name} is required\n${usage()}`);
      process.exit(2);
    }
  }
  const context = {};
  for (const pair of values.context) {
    const eq = pair.indexOf('=');
    if (eq <= 0) {
      process.stderr.write(`${PROG}: --context wants K=V, got '${pair}'\n`);
      process.exit(2);
    }
    context[pair.slice(0, eq)] = pair.slice(eq + 1);
  }
  const timeout = Number(values.timeout);
  if (!(timeout > 0)) fail(`--timeout must be a positive number of seconds`);
  return { ...values, context, timeout };
}

function read(file) {
  try {
    return fs.readFileSync(file);
  } catch (e) {
    fail(`cannot read ${file}: ${e.code || e.message}`);
  }
}

function loadDeps() {
  try {
    return {
      grpc: require('@grpc/grpc-js'),
      protoLoader: require('@grpc/proto-loader'),
    };
  } catch (e) {
    fail(`cannot load @grpc/grpc-js or @grpc/proto-loader ` +
      `(run "npm ci" in ${__dirname}): ${e.message}`);
  }
}

// Promise form of a unary call, with a deadline.
function call(client, method, request, timeoutSeconds) {
  const deadline = new Date(Date.now() + timeoutSeconds * 1000);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (err, response) => {
      if (err) reject(err);
      else resolve(response);
    });
  });
}

async function main() {
  const args = parse();
  const { grpc, protoLoader } = loadDeps();

  const kmsProto = path.join(args['proto-dir'], 'custos', 'v1', 'kms.proto');
  if (!fs.existsSync(kmsProto)) {
    fail(`custos/v1/kms.proto not found under --proto-dir ${args['proto-dir']}`);
  }
  const definition = protoLoader.loadSync('custos/v1/kms.proto', {
    includeDirs: [args['proto-dir']],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
  });
  const custos = grpc.loadPackageDefinition(definition).custos.v1;

  const credentials = grpc.credentials.createSsl(
    read(args.ca), read(args.key), read(args.cert));
  const client = new custos.CryptoService(args.addr, credentials);

  const codeName = (code) =>
    Object.keys(grpc.status).find((k) => grpc.status[k] === code) || code;
  let generated;
  let decrypted;
  try {
    generated = await call(client, 'GenerateDataKey', {
      key: args['key-name'],
      encryption_context: args.context,
    }, args.timeout);
  } catch (e) {
    client.close();
    fail(`GenerateDataKey failed: ${codeName(e.code)}: ${e.details}`);
  }
  try {
    decrypted = await call(client, 'Decrypt', {
      ciphertext_blob: generated.ciphertext_blob,
      encryption_context: args.context,
    }, args.timeout);
  } catch (e) {
    client.close();
    fail(`Decrypt failed: ${codeName(e.code)}: ${e.details}`);
  }
  client.close();

  const a = generated.plaintext;
  const b = decrypted.plaintext;
  const same = a.length > 0 && a.length === b.length &&
    crypto.timingSafeEqual(a, b);
  // The example only compares the data key; a real client would use it,
  // then overwrite it.
  a.fill(0);
  b.fill(0);
  if (!same) fail('Decrypt returned a different plaintext than GenerateDataKey');
  if (decrypted.key_id !== generated.key_id) {
    fail(`Decrypt used key ${decrypted.key_id}, expected ${generated.key_id}`);
  }
  process.stdout.write(JSON.stringify({
    key_id: generated.key_id,
    key_version: generated.key_version,
    ok: true,
  }) + '\n');
}

main().catch((e) => fail(e.stack || String(e)));
