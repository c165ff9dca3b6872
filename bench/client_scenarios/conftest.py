import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_report_header(config):
    import peft
    return f"peft in use: {peft!r}; PeftModel from {peft.PeftModel.__module__}"
