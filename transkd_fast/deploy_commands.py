"""CLI subcommands ``export`` and ``predict`` (see :mod:`transkd_fast.export`, :mod:`transkd_fast.predict`).

Both load the network from any file ``evaluate --weights`` reads; the model name and class count
come from the file unless ``--model`` / ``--num-classes`` say otherwise.
"""

from __future__ import annotations

import argparse

from transkd_fast.cli import SUBCOMMANDS


def _add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True,
                   help="model.pt, last.pt (a distill checkpoint gives its student), or an "
                        "NVlabs/TransKD/mmseg/HF checkpoint")
    p.add_argument("--model", default=None,
                   help="segformer_b0..b5 (predict: also pvt_v2_b*); default: recorded in or guessed from the file")
    p.add_argument("--num-classes", type=int, default=None,
                   help="outputs that are classes (default: from the file; a void output is not one)")
    p.add_argument("--dataset", default=None,
                   help="synthetic | cityscapes | acdc | voc: class names and palette "
                        "(default: the file's, or the one dataset with that many classes)")
    p.add_argument("--allow-partial-weights", action="store_true",
                   help="accept weight files that load < 90%% of the model's tensors")


def _load(args):
    from transkd_fast.export import load_model

    loaded = load_model(args.weights, args.model, args.num_classes, args.allow_partial_weights)
    print(f"{loaded.name}: weights {loaded.summary}", flush=True)
    return loaded


def _add_export(p: argparse.ArgumentParser) -> None:
    from transkd_fast.export import FORMATS, ONNX_OPSET

    _add_weights(p)
    p.add_argument("--format", default="onnx",
                   help=f"{' | '.join(FORMATS)}, or several comma-separated (one trace serves onnx and "
                        "torch-export) (default: onnx)")
    p.add_argument("--output", default="exported",
                   help="output folder: model.onnx, model.pt2, hf/ (default: exported)")
    p.add_argument("--verify", action="store_true",
                   help="run each export at two input sizes (onnxruntime, torch.export.load, transformers) "
                        "and fail above 1e-4 relative logit difference")
    p.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset, ≥ 17 (default: {ONNX_OPSET})")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="hf: the preprocessor normalizes with ImageNet mean/std (default: as recorded in a "
                        "training checkpoint, else no)")


def _run_export(args: argparse.Namespace) -> int:
    from transkd_fast import export as ex
    from transkd_fast.predict import dataset_classes

    formats = ex.parse_formats(args.format)
    loaded = _load(args)
    names, _ = dataset_classes(loaded.num_classes, args.dataset or loaded.dataset)
    names = list(names) if names is not None else [f"class_{i}" for i in range(loaded.num_classes)]
    names += ["void"] * (loaded.num_outputs > len(names))
    normalize = loaded.normalize if args.normalize is None else args.normalize
    ex.export(loaded.model, args.output, formats, verify=args.verify, class_names=names, normalize=normalize,
              opset=args.opset)
    return 0


def _add_predict(p: argparse.ArgumentParser) -> None:
    from transkd_fast.predict import OUTPUT_KINDS

    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (walked) or glob patterns")
    _add_weights(p)
    p.add_argument("--output-dir", default="predictions", help="where the PNGs go (default: predictions)")
    p.add_argument("--outputs", default="color,ids",
                   help=f"comma-separated: {', '.join(OUTPUT_KINDS)} (labelids: Cityscapes label ids for the "
                        "official test server) (default: color,ids)")
    p.add_argument("--overlay", action="store_true", help="also write the colouring blended over the image")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colouring (default: 0.5)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward (equal sizes batch) (default: 4)")
    p.add_argument("--height", type=int, default=None,
                   help="resize images to this height first (default: as recorded in a training checkpoint, "
                        "else native size); predictions are at the image's own size")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="ImageNet mean/std normalization (default: as recorded in a training checkpoint, else no)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="fp32 | bf16: weights and activations in bfloat16, logits back in fp32 (default: fp32)")
    # evaluate's inference flags, with its defaults and help (engine.config.EvalConfig, engine.commands.HELP)
    from transkd_fast.engine.commands import HELP
    from transkd_fast.engine.config import EvalConfig

    d = EvalConfig()
    p.add_argument("--inference", default=d.inference, choices=("whole", "slide"),
                   help=f"{HELP['inference']} (default: {d.inference})")
    p.add_argument("--slide-crop", type=int, default=d.slide_crop,
                   help=f"{HELP['slide_crop']} (default: {d.slide_crop})")
    p.add_argument("--slide-stride", type=int, default=d.slide_stride, help=HELP["slide_stride"])
    p.add_argument("--tta", action="store_true", help=HELP["tta"])
    p.add_argument("--tta-scales", default=d.tta_scales, help=f"{HELP['tta_scales']} (default: {d.tta_scales})")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")


def _run_predict(args: argparse.Namespace) -> int:
    from transkd_fast.engine.inference import Inference
    from transkd_fast.engine.trainer import apply_threads, resolve_device
    from transkd_fast.predict import predict
    from transkd_fast.runtime import tune_cpu_allocator

    outputs = [o.strip() for o in args.outputs.split(",") if o.strip()]
    inference = Inference.from_config(args)  # evaluate's flags, refused as there, before the model loads
    apply_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cpu":  # full-size inference buffers are reused, not faulted in per batch
        tune_cpu_allocator()
    loaded = _load(args)
    res = predict(loaded.model.to(device), args.inputs, args.output_dir, num_classes=loaded.num_classes,
                  outputs=outputs, overlay=args.overlay, alpha=args.alpha, batch_size=args.batch_size,
                  height=args.height if args.height is not None else loaded.height,
                  normalize=loaded.normalize if args.normalize is None else args.normalize,
                  dataset=args.dataset or loaded.dataset, device=device, progress=args.progress,
                  precision=args.precision, inference=inference)
    print(f"predicted {res.images} images in {res.batches} batches: {len(res.files)} PNGs under {args.output_dir}")
    return 0


SUBCOMMANDS["export"] = ("export a SegFormer student to ONNX, a Hugging Face folder or a torch.export program",
                         _add_export, _run_export)
SUBCOMMANDS["predict"] = ("segment images (files, folders, globs) and write colour / id / Cityscapes labelIds PNGs",
                          _add_predict, _run_predict)
