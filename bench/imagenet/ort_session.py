"""The ONNX Runtime session every Python peer here uses, set up as
bench/ort_python_eval.py does: CPU provider, all graph optimisations,
`threads` intra-op threads and one inter-op thread."""

import onnxruntime as ort


def cpu_session(model, threads):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
