

# export's options, here so that the command line's parser (every 'imgclf' start, --help included)
# does not import torch through imgclf.deploy.export to read them
FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17  # onnxruntime >= 1.14 runs it; every op FastNet/ResNets need exists there
PARITY_IMAGES = 64
