#!/usr/bin/python3
"""Custos from Python: GenerateDataKey, then Decrypt, over mutual TLS.

Generates the Python stubs from proto/ at run time (protoc with Debian's
grpc_python_plugin) into a temporary directory, asks custosd for a data key
under --key-name with the given encryption context, decrypts the blob with
the same context, and checks that both plaintexts match. Prints one JSON
line: {"key_id": ..., "key_version": ..., "ok": true}. The data key itself is
never printed.

Needs Debian's python3-grpcio, python3-protobuf, protobuf-compiler and
protobuf-compiler-grpc; run it with /usr/bin/python3. See README.md.
"""

import argparse
import hmac
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

PROG = "custos_example"
GRPC_PYTHON_PLUGIN = "/usr/bin/grpc_python_plugin"
PROTO_FILES = ["custos/v1/resources.proto", "custos/v1/kms.proto"]


def fail(message, code=1):
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(code)


def parse_args():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(
        prog=PROG,
        description="GenerateDataKey + Decrypt against custosd over mTLS.")
    p.add_argument("--addr", default=os.environ.get("CUSTOS_ADDR"),
                   help="host:port of custosd (default $CUSTOS_ADDR)")
    p.add_argument("--ca", default=os.environ.get("CUSTOS_CA"),
                   help="CA certificate PEM (default $CUSTOS_CA)")
    p.add_argument("--cert", default=os.environ.get("CUSTOS_CERT"),
                   help="client certificate PEM (default $CUSTOS_CERT)")
    p.add_argument("--key", default=os.environ.get("CUSTOS_KEY"),
                   help="client private key PEM (default $CUSTOS_KEY)")
    p.add_argument("--key-name", required=True,
                   help='key id ("k-...") or alias ("alias/NAME")')
    p.add_argument("--context", action="append", default=[], metavar="K=V",
                   help="encryption-context pair; repeat for more")
    p.add_argument("--proto-dir",
                   default=os.path.normpath(os.path.join(here, "..", "..", "proto")),
                   help="directory holding custos/v1/*.proto "
                        "(default: the repository's proto/)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="deadline per call, in seconds (default 10)")
    args = p.parse_args()
    for name in ("addr", "ca", "cert", "key"):
        if not getattr(args, name):
            p.error(f"--{name} is required (or set CUSTOS_{name.upper()})")
    context = {}
    for pair in args.context:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            p.error(f"--context wants K=V, got {pair!r}")
        context[k] = v
    args.context = context
    return args


def generate_stubs(proto_dir, out_dir):
    """Runs protoc into out_dir and makes the modules importable."""
    for tool in ("protoc", GRPC_PYTHON_PLUGIN):
        if shutil.which(tool) is None:
            fail(f"{tool} not found (apt-get install protobuf-compiler "
                 "protobuf-compiler-grpc)")
    for f in PROTO_FILES:
        if not os.path.isfile(os.path.join(proto_dir, f)):
            fail(f"{f} not found under --proto-dir {proto_dir}")
    cmd = ["protoc", f"-I{proto_dir}", f"--python_out={out_dir}",
           f"--grpc_out={out_dir}",
           f"--plugin=protoc-gen-grpc={GRPC_PYTHON_PLUGIN}", *PROTO_FILES]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        fail(f"protoc failed:\n{done.stderr}")
    sys.path.insert(0, out_dir)
    kms_pb2 = importlib.import_module("custos.v1.kms_pb2")
    kms_pb2_grpc = importlib.import_module("custos.v1.kms_pb2_grpc")
    return kms_pb2, kms_pb2_grpc


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")


def main():
    args = parse_args()
    try:
        import grpc  # Debian's python3-grpcio
    except ImportError:
        fail("python module grpc not found: apt-get install python3-grpcio "
             "python3-protobuf, and run with /usr/bin/python3")

    with tempfile.TemporaryDirectory(prefix="custos-py-stubs-") as stubs:
        kms_pb2, kms_pb2_grpc = generate_stubs(args.proto_dir, stubs)
        creds = grpc.ssl_channel_credentials(
            root_certificates=read(args.ca),
            private_key=read(args.key),
            certificate_chain=read(args.cert))
        with grpc.secure_channel(args.addr, creds) as channel:
            crypto = kms_pb2_grpc.CryptoServiceStub(channel)
            try:
                generated = crypto.GenerateDataKey(
                    kms_pb2.GenerateDataKeyRequest(
                        key=args.key_name,
                        encryption_context=args.context),
                    timeout=args.timeout)
            except grpc.RpcError as e:
                fail(f"GenerateDataKey failed: {e.code().name}: {e.details()}")
            try:
                decrypted = crypto.Decrypt(
                    kms_pb2.DecryptRequest(
                        ciphertext_blob=generated.ciphertext_blob,
                        encryption_context=args.context),
                    timeout=args.timeout)
            except grpc.RpcError as e:
                fail(f"Decrypt failed: {e.code().name}: {e.details()}")

    # Python cannot wipe bytes objects; the example only compares and drops
    # them. A real client would use the data key, then forget it.
    same = (len(generated.plaintext) > 0 and
            hmac.compare_digest(generated.plaintext, decrypted.plaintext))
    if not same:
        fail("Decrypt returned a different plaintext than GenerateDataKey")
    if decrypted.key_id != generated.key_id:
        fail(f"Decrypt used key {decrypted.key_id}, expected {generated.key_id}")
    print(json.dumps({"key_id": generated.key_id,
                      "key_version": generated.key_version,
                      "ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
