"""Source files of the Triton Python-backend models in a serving repository (:mod:`runtime.serve_repository`
copies each into ``<model>/1/model.py``): ``component_model.py`` runs one exported component in ONNX Runtime,
``pipeline_model.py`` turns a prompt into an image by calling the component models over BLS. They import
``triton_python_backend_utils``, which exists only inside Triton's Python backend stub."""
