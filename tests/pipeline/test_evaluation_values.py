"""evaluate_run with a classifier judge reports the numbers of the images it generated (issue 23).

test_evaluation checks that judge_accuracy lies in [0, 1] and that FD is finite; here a stand-in
pipeline hands out real digits of the requested classes (or of the wrong ones), so judge_accuracy
must equal the classifier's accuracy on exactly those images, computed here, and FD must equal
frechet_distance of the classifier's features of them against all digits. The noise-aware
classifier's accuracy at t = 0 must be its accuracy on the clean held-out images.
"""
import pytest
import torch

from diffusekit import metrics as M
from diffusekit.data import split_heldout
from diffusekit.store.classifier import ClassifierTrainConfig, load_classifier
from diffusekit.training.classifier import train_classifier
from diffusekit.data import DataConfig, load_dataset
from diffusekit.evaluation import evaluate_run, judge_accuracy


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig())


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    out = tmp_path_factory.mktemp("judge")
    train_classifier(DataConfig(), out, train_cfg=ClassifierTrainConfig(
        steps=60, batch_size=64, warmup_steps=10, max_shift=0, device="cpu"), progress=False)
    return out, load_classifier(out)[0]


class DigitsOfTheClass:
    """A stand-in class-conditional Pipeline: for label y it returns the next digit image of class (y + shift) % 10."""
    num_classes, device, model = 10, "cpu", None

    def __init__(self, data, shift: int = 0):
        self.by_class = {c: data.images[data.labels == c] for c in range(10)}
        self.used = {c: 0 for c in range(10)}
        self.shift, self.image_shape, self.given = shift, tuple(data.images.shape[1:]), []

    def sample(self, n, class_labels=None, **kwargs):
        out = []
        for y in class_labels.tolist():
            c = (y + self.shift) % 10
            out.append(self.by_class[c][self.used[c]])
            self.used[c] += 1
        images = torch.stack(out)
        self.given.append((class_labels.clone(), images))
        return images

    def sampler_for(self, name, **options):
        import diffusekit as dk
        return dk.get_sampler(name, dk.NoiseSchedule.create("linear", 100), **options)


@pytest.mark.parametrize("shift", [0, 3])
def test_judge_accuracy_and_fd_are_those_of_the_images_generated(digits, judge, tmp_path, shift):
    out, classifier = judge
    pipe = DigitsOfTheClass(digits, shift)
    result = evaluate_run(pipe, DataConfig(), 60, sampler="ddim", num_steps=2, features=f"classifier:{out}",
                          cache_dir=tmp_path, batch_size=20, progress=False)
    labels = torch.cat([y for y, _ in pipe.given])
    images = torch.cat([x for _, x in pipe.given])
    assert torch.equal(labels, torch.arange(60) % 10)          # balanced requested classes
    with torch.no_grad():
        predicted = classifier.eval()(images).argmax(1)
    expected = int((predicted == labels).sum()) / len(labels)
    assert result["judge_accuracy"] == pytest.approx(expected, abs=1e-12)
    # real digits of the asked class are mostly recognised; of another class, mostly not
    assert expected > 0.7 if shift == 0 else expected < 0.3
    features = M.ClassifierFeatures(classifier)
    fake = features(images).double().numpy()
    real = torch.cat([features(x) for x in digits.images.split(500)]).double().numpy()
    fd = M.frechet_distance(*M.feature_stats(fake), *M.feature_stats(real))
    assert result["fd"] == pytest.approx(fd, rel=1e-6)


def test_judge_accuracy_is_the_share_recognised(judge, digits):
    _, classifier = judge
    images, labels = digits.images[:50], digits.labels[:50]
    with torch.no_grad():
        predicted = classifier(images).argmax(1)
    flipped = labels.clone()
    flipped[:10] = (flipped[:10] + 1) % 10                     # ten labels made wrong on purpose
    right = (predicted == labels)[:10].sum().item()
    assert judge_accuracy(classifier, images, labels) == pytest.approx(float((predicted == labels).float().mean()))
    assert judge_accuracy(classifier, images, flipped) == pytest.approx(
        float((predicted == labels).float().mean()) - (right - int((predicted == flipped)[:10].sum())) / 50)


def test_heldout_accuracy_at_t0_is_the_clean_accuracy(tmp_path):
    from diffusekit.store.classifier import default_classifier_config
    from diffusekit.schedule import ScheduleConfig
    cfg = default_classifier_config(8, 1, 10, base_channels=8, channel_mult=(1, 2), groups=4)
    result = train_classifier(DataConfig(), tmp_path, cfg, ClassifierTrainConfig(
        steps=20, batch_size=32, noise_aware=True, device="cpu"), ScheduleConfig(num_train_timesteps=100),
        progress=False)
    by_t = result.metrics["heldout_accuracy_at_t"]
    _, held, _ = split_heldout(DataConfig(), load_dataset(DataConfig()), 0.1, seed=0)
    model = result.model.eval()
    with torch.no_grad():
        clean = int((model(held.images, torch.zeros(len(held.images))).argmax(1) == held.labels).sum()) / len(held)
    # at t = 0 there is no noise: the noise-aware accuracy is the clean one, on the same held-out images
    assert by_t["0"] == pytest.approx(clean, abs=1e-9)
    assert by_t["0"] == pytest.approx(result.accuracy, abs=1e-9)
