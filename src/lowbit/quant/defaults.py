"""Defaults shared by the quantization verbs (``lowbit.quantize``, ``lowbit.sweep``, the CLI), free of torch imports
so that importing ``lowbit`` stays cheap."""

# Why 512 calibration images: at 96 px the last EfficientNet-Lite0 stages see 3x3 maps, so 128 images give about
# as many input rows as those layers have inputs (1152) and GPTQ's Hessian is under-determined. With 512, w4 GPTQ
# keeps 0.8789 of fp32's 0.8857 on the 10k Fashion-MNIST test set (benchmarks/results/ptq.json), and the whole w4
# quantization of lit-fashion takes about a minute on 2 cores.
DEFAULT_CALIB_SAMPLES = 512
