"""Distillation losses: logit KD (`kd`), multi-teacher fusion (`fusion`) and feature methods (`feature`).

Each loss is a pure function, student argument first; `LogitKD` and `FeatureKD` wrap them as engine losses.
"""
from kdtrack.losses.attention import AttentionTransfer, at_loss, attention_map
from kdtrack.losses.factor_transfer import (FactorTransfer, Paraphraser, Translator, factor_transfer_loss,
                                            train_paraphraser)
from kdtrack.losses.feature import FEATURE_METHODS, FeatureKD, build_feature_method
from kdtrack.losses.fitnet import FitNet, fitnet_loss
from kdtrack.losses.fusion import FUSION_METHODS, fuse_teachers
from kdtrack.losses.kd import (KDLossConfig, LogitKD, compute_confidence_weights, compute_kd_weight,
                               compute_student_loss, kd_loss, regression_loss)
from kdtrack.losses.rkd import RKD, rkd_angle_loss, rkd_distance_loss, rkd_loss

__all__ = [
    "FEATURE_METHODS", "FUSION_METHODS", "AttentionTransfer", "FactorTransfer", "FeatureKD", "FitNet",
    "KDLossConfig", "LogitKD", "Paraphraser", "RKD", "Translator", "at_loss", "attention_map",
    "build_feature_method", "compute_confidence_weights", "compute_kd_weight", "compute_student_loss",
    "factor_transfer_loss", "fitnet_loss", "fuse_teachers", "kd_loss", "regression_loss", "rkd_angle_loss",
    "rkd_distance_loss", "rkd_loss", "train_paraphraser",
]
