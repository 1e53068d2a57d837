"""TensorRT and TensorRT-RTX engines built from the stage-2 ONNX, one module per job.

- :mod:`runtime.trt.backend`: which library (``trt``/``trtrtx``) builds or runs an engine, target names;
- :mod:`runtime.trt.builder_log`: the logger that keeps the builder's lines, and its sparsity report;
- :mod:`runtime.trt.onnx_inspect`: precision, N:M weights and I/O of an ONNX, read without building;
- :mod:`runtime.trt.options`: builder settings and the optimisation profile they give;
- :mod:`runtime.trt.build`: building one engine or every component's, with reuse;
- :mod:`runtime.trt.engine`: running a checked plan (or a set of static ones) on CUDA tensors;
- :mod:`runtime.trt.plans`: which plan a component directory holds.

Engine manifests are :mod:`runtime.manifest`. Design notes (what each library supports): docs/tensorrt.md.
"""
