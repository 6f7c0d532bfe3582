"""`imgclf export` and `imgclf serve`."""

from __future__ import annotations

import argparse


def add_export(sub) -> None:
    from imgclf.deploy import DEFAULT_OPSET, FORMATS, PARITY_IMAGES

    # what is in the graph and what is not, said exactly: a caller that trusts "preprocessing
    # inside" and feeds another size or resize gets confident, different answers
    p = sub.add_parser("export", help="export a run to ONNX or TorchScript (normalisation and calibration inside; "
                                      "you resize) with a parity check",
                       description="The exported model takes uint8 RGB images, N x S x S x 3 (NHWC), S the run's "
                                   "image_size, and refuses anything else. It does not resize: resize each image "
                                   "to S x S exactly as the metadata key resize_details says (the run's policy, "
                                   "bicubic; in OUT.json beside the file and embedded in it), or answers change "
                                   "('imgclf serve' of an .onnx does this for you). Inside: "
                                   "uint8 -> (x/255 - mean)/std, the network, softmax (sigmoid for multi-label) "
                                   "of logits / temperature. Outputs: logits and probs. A parity check on real "
                                   "images compares it with PyTorch. The metadata (classes, task, image_size, "
                                   "resize_details, mean, std, temperature, thresholds) is one JSON object, in "
                                   "OUT.json and inside the file: an ONNX file's metadata_props key 'imgclf' "
                                   "(onnxruntime: session.get_modelmeta().custom_metadata_map['imgclf']), a "
                                   "TorchScript file's extra file imgclf.json (extra = {'imgclf.json': ''}; "
                                   "torch.jit.load(OUT, _extra_files=extra); json.loads(extra['imgclf.json'])).")
    p.add_argument("run", help="run folder")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx (for onnxruntime and 'imgclf serve') or torchscript (for torch.jit.load)")
    p.add_argument("--out", "--output", dest="out", help="output file (default: RUN/model.onnx or RUN/model.torchscript.pt)")
    # None when not given: an explicit --opset with --format torchscript is refused, not ignored
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET}; onnx only)")
    p.add_argument("--parity-images", type=int, default=PARITY_IMAGES,
                   help="real images compared between the exported file and PyTorch")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from imgclf.deploy.export import export

    export(args.run, args.format, args.out, opset=args.opset, parity_images=args.parity_images)
    return 0


def add_serve(sub) -> None:
    from imgclf.cli import _positive_int
    from imgclf.deploy.server import LOG_LEVELS, PRECISIONS, ServeConfig

    d = ServeConfig(model="")
    p = sub.add_parser("serve", help="HTTP server with a web page: POST /v1/predict, GET /v1/model, /healthz, /metrics",
                       description="POST /v1/predict takes multipart/form-data (field 'file', or repeated 'files'), "
                                   "the raw bytes of one image (Content-Type image/* or application/octet-stream) "
                                   "or JSON {\"images\": [base64, ...]} (or {\"image\": ...}); top_k (1-1000, "
                                   "default --top-k) in the query string (?top_k=3), a form field or the JSON body. "
                                   "An unknown query parameter, form field or JSON key is a 422, never ignored. "
                                   "Errors are JSON {\"error\": \"...\"} with a 4xx status (503 + Retry-After when "
                                   "busy). GET / is a web page; GET /v1/model describes the model; /healthz and "
                                   "/metrics (Prometheus) are for monitoring.")
    p.add_argument("model", metavar="RUN_OR_ONNX", help="run folder or .onnx file from 'imgclf export'")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on, 0-65535 (0: any free port)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="images per forward pass at most")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="how long a request waits for others to batch with")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_mb, help="request body limit")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="largest decoded image (width x height)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="default number of classes returned")
    p.add_argument("--decode-threads", type=int, default=0, help="threads decoding images (0: auto)")
    p.add_argument("--max-in-flight", type=int, default=d.max_in_flight,
                   help="images decoding or waiting at once; more gets 503 + Retry-After (0: 4 x images per request)")
    p.add_argument("--threads", type=int, default=0, help="inference threads (0: cpus - 1, at least 1)")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections per worker at once, more get 503 before their upload is read: bounds "
                        "the memory of concurrent uploads to about this x --max-body-mb (0: no limit)")
    # 1 or more: 0 would read as 'one per core' (train's --workers), which is not what serving wants
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="server processes, 1 or more (each loads the model and batches on its own; 1 is best on few cores)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N or auto (cuda when available; a run folder also takes mps): a run folder "
                        "runs on torch's device, an .onnx on onnxruntime's CUDA provider (needs onnxruntime-gpu)")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="a run folder's arithmetic: fp32 (default, the exported model's answers) or auto/bf16/fp16 "
                        "autocast (faster batches where the device has the instructions); an .onnx runs in fp32")
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="warning",
                   help="uvicorn's log level (default: warning)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from imgclf.deploy.server import ServeConfig, serve

    cfg = ServeConfig(model=args.model, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                      max_body_mb=args.max_body_mb, max_pixels=args.max_pixels, top_k=args.top_k,
                      decode_threads=args.decode_threads, device=args.device, threads=args.threads,
                      max_in_flight=args.max_in_flight, precision=args.precision,
                      max_connections=args.max_connections)
    serve(cfg, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level)
    return 0


COMMANDS = [add_export, add_serve]
