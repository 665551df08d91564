"""TensorRT API conformance without a GPU: the real bindings of TensorRT 10 and 11 (bindings.py, describe.py) against
what ``engines/`` uses (usage.py), checked by conformance.py; the test is tests/test_trt_api.py."""
