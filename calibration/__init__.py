"""INT8 calibration of exported graphs (``cvvae calibrate``) and the per-precision accuracy report
(``cvvae accuracy``). See docs/int8.md.

* :mod:`cvvae.calibration.data` - calibration chunks from real videos at the plan's chunk and tile sizes;
* :mod:`cvvae.calibration.quantize` - Q/DQ graphs (symmetric int8, per-channel weights) and ``calibrate_export``;
* :mod:`cvvae.calibration.sensitivity` - layer groups ranked by the PSNR they cost, exclusion to a target;
* the accuracy report (PSNR/SSIM/max-abs of fp32, fp16 and int8 through the runtime) is :mod:`cvvae.tools.accuracy`:
  it runs the runtime, a layer above this one (docs/architecture.md); ``cvvae accuracy`` is registered here.

Importing this package is cheap; ONNX Runtime's quantization tools load when used.
"""
