"""``e[i]`` cuts the model's outputs by what each part is, never because a length happens to equal the batch."""
from collections import namedtuple

import torch

from guided_swap.maps import Explanation, LayerMaps

Heads = namedtuple("Heads", "logits aux")


def _explanation(outputs, batch=2):
    A, G = torch.rand(batch, 4, 3, 3), torch.randn(batch, 4, 3, 3)
    return Explanation(logits=torch.randn(batch, 0), target=None, score=torch.zeros(batch),
                       gradient=torch.randn(batch, 3, 12, 12), layers={"l": LayerMaps(A, G, (12, 12))},
                       outputs=outputs)


def test_a_detectors_list_keeps_one_whole_dict_per_image():
    # Image 0 has 2 detections, as many as there are images: its boxes must not be cut.
    detections = [{"boxes": torch.rand(2, 4), "scores": torch.rand(2)},
                  {"boxes": torch.rand(3, 4), "scores": torch.rand(3)}]
    e = _explanation(detections)
    first, second = e[0].outputs, e[1].outputs
    assert len(first) == len(second) == 1
    assert first[0]["boxes"] is detections[0]["boxes"] and second[0]["scores"] is detections[1]["scores"]
    assert e[0:2].outputs == detections


def test_batch_major_outputs_are_cut_part_by_part():
    logits, aux, table = torch.randn(2, 10), torch.randn(2, 5), torch.randn(7, 2)
    e = _explanation({"heads": Heads(logits, aux), "table": table})  # a tuple of two heads, batch 2
    out = e[1].outputs
    assert isinstance(out["heads"], Heads)
    assert torch.equal(out["heads"].logits, logits[1:]) and torch.equal(out["heads"].aux, aux[1:])
    assert out["table"] is table  # its first dimension is not the batch: not batch-major, kept whole
