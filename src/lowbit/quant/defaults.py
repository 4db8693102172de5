"""Defaults shared by the quantization verbs (``lowbit.quantize``, ``lowbit.sweep``, the CLI), free of torch imports
so that importing ``lowbit`` stays cheap."""

# Why 512 calibration images: at 96 px the last EfficientNet-Lite0 stages see 3x3 maps, so 128 images give about
# as many input rows as those layers have inputs (1152) and GPTQ's Hessian is under-determined. With 512, w4 GPTQ
# keeps 0.8789 of fp32's 0.8857 on the 10k Fashion-MNIST test set (benchmarks/results/ptq.json), and the whole w4
# quantization of lit-fashion takes about a minute on 2 cores.
DEFAULT_CALIB_SAMPLES = 512

# With no calibration data given, a lowbit model calibrates on its family's own set (FamilySpec.calibration_data:
# Fashion-MNIST only for the models built on it) or on this domain-general, generated image set
# (lowbit.data.scenes): never silently on Fashion-MNIST.
DEFAULT_IMAGE_CALIBRATION = "scenes"

# Language models with no calibration data given: LM_CALIB_SEQUENCES (at most; fewer when --calib-samples is
# smaller) sequences of LM_CALIB_TOKENS tokens sampled from the model itself (data-free, LLM-QAT). Given text is
# cut into windows of the same length.
SELF_GENERATED = "self-generated"
LM_CALIB_SEQUENCES = 128
LM_CALIB_TOKENS = 128
