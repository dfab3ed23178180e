"""Models chosen by name: add a variant with one file and one entry here."""

from jaxcap.models.resnet import ResNet

ENCODERS = {"resnet": ResNet}
