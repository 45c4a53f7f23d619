"""The Python API: the Keras verbs from `import cnnkit`, on a real MNIST slice."""

import numpy as np
import torch

import cnnkit
from slices import SHARED_DATA


def test_keras_style_workflow_and_saved_run(tmp_path):
    result = cnnkit.train(dataset="mnist", data_dir=str(SHARED_DATA), epochs=1, limit_train=3000, limit_eval=500,
                          runs_dir=str(tmp_path), progress=False, log=lambda *_: None)
    assert result.run_dir == tmp_path / "train"
    assert set(result.history.history) >= {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"}

    data = cnnkit.load_dataset("mnist", str(SHARED_DATA), limit_train=3000, limit_eval=500, progress=False)
    run = cnnkit.load_run(result.run_dir)
    report = cnnkit.evaluate(run.model, data.test, data.classes)
    assert report.accuracy == result.metrics["test_accuracy"]  # the same model, the same test slice

    probabilities = cnnkit.predict(run.model, data.test.images[:20])  # callable even after api was imported
    assert probabilities.shape == (20, 10)
    assert torch.allclose(probabilities.sum(1), torch.ones(20), atol=1e-5)
    assert np.array_equal(probabilities.argmax(1).numpy(), report.predictions[:20].numpy())


def test_package_import_is_light():
    import subprocess
    import sys

    code = "import sys, cnnkit, cnnkit.cli; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
