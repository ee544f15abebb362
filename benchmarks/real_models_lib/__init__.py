"""Helpers of ``benchmarks/real_models.py``: pretrained models from PyPI under compression.

* :mod:`.common`: dependency checks, the cache directory, weight layouts, metrics.
* :mod:`.data`: photo crops (scikit-learn's and scikit-image's sample photos) and rendered text.
* :mod:`.effnet`: EfficientNet-lite0/1/2 (PyTorch state dicts), evaluation and sensitivity.
* :mod:`.ocr`: PP-OCR recognizer and detector (ONNX initializers), evaluation.
* :mod:`.methods`: the compression methods (float32, baselines, jaxjpeg variants).
* :mod:`.report`: printing, JSON, Markdown and the plot.
"""
