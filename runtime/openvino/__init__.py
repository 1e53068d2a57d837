"""OpenVINO, the CPU runtime beside ONNX Runtime, reading the same stage-2 ONNX; one module per job.

- :mod:`runtime.openvino.library`: the lazily imported library (a host without it gets one line naming ``make setup``),
  its version and the one ``Core``;
- :mod:`runtime.openvino.precision`: the inference precision hint (f32 or bf16; the default follows the CPU);
- :mod:`runtime.openvino.session`: :class:`~runtime.openvino.session.OvModel`, one compiled component behind the call
  the pipeline runner makes of ONNX Runtime sessions;
- :mod:`runtime.openvino.build`: ``build --backend openvino``: compiled models in a directory, with manifests checked
  before use;
- :mod:`runtime.openvino.nncf_peers`: NNCF's own INT8 quantization and INT4 weight compression of an ONNX (the peers of
  the project's ModelOpt INT8 and OBS 4-bit).

What OpenVINO reads, how fast, and how precise: docs/openvino.md.
"""
