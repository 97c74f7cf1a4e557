"""Usage: ``from cnnlab.data import load_data, Data, DataSpec``: the data layer.

``loader`` reads the configured data set, splits and batches it; ``spec`` describes it
(``DataSpec``); ``registry`` knows the data sets by name; each data set is one module of its own
(``fashion_mnist``). Nothing outside this package needs to know which data set it is.
"""

from cnnlab.data.loader import Augment, Data, channel_stats, load_data
from cnnlab.data.registry import DATA_SETS, DEFAULT, data_set, describe, described
from cnnlab.data.spec import DataSpec
from cnnlab.data.splits import Split, stratified_split

__all__ = ["DATA_SETS", "DEFAULT", "Augment", "Data", "DataSpec", "Split", "channel_stats", "data_set", "describe", "described",
           "load_data", "stratified_split"]
