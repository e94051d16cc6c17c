"""A weight-sharing supernet of a mobile search space, in which K = 1 is the static conv.

>>> from search_spaces.mobile import MobileCifarSpace
>>> supernet = Supernet(MobileCifarSpace(input_size=16))
>>> model = supernet.extract(supernet.smallest)   # build_model(arch) with the subnet's weights
>>> type(model).__name__
'DynasNet'

* :mod:`dynas.supernet.elastic` -- elastic ops (channel prefixes, centre-cropped kernels, the
  first K kernels and attention logits of a dynamic convolution);
* :mod:`dynas.supernet.model` -- :class:`Supernet` (``activate``, ``extract``, ``save``) and
  :func:`load_supernet`;
* :mod:`dynas.supernet.train` -- :func:`train_supernet`, sandwich-rule training with in-place
  distillation, resumable, under ``torchrun`` with DistributedDataParallel;
* :mod:`dynas.supernet.score` -- :func:`score_subnet`: BN recalibration, then validation top-1.
"""

from dynas.supernet.elastic import (
    ElasticBatchNorm2d,
    ElasticConv2d,
    ElasticKernelAttention,
    ElasticLinear,
    ElasticSqueezeExcite,
)
from dynas.supernet.model import FILE_FORMAT, Supernet, load_supernet, read_supernet_file
from dynas.supernet.score import SubnetScore, recalibrate_bn, score_subnet
from dynas.supernet.train import SupernetTrainConfig, SupernetTrainResult, init_distributed, train_supernet

__all__ = [
    "FILE_FORMAT",
    "ElasticBatchNorm2d",
    "ElasticConv2d",
    "ElasticKernelAttention",
    "ElasticLinear",
    "ElasticSqueezeExcite",
    "SubnetScore",
    "Supernet",
    "SupernetTrainConfig",
    "SupernetTrainResult",
    "init_distributed",
    "load_supernet",
    "read_supernet_file",
    "recalibrate_bn",
    "score_subnet",
    "train_supernet",
]
