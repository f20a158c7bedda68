"""Pictures of a run, as PNG files (matplotlib on the Agg canvas: no display needed).

- `visualize_ranked_results`: queries and their top-k gallery images, green/red frames, distances (`--visrank`);
- `dmmd_histograms`: within/between-class distance histograms, source and target, before and after D-MMD;
- `training_curves`: losses and mAP per dataset over epochs, from a stage's metrics.json;
- `pipeline_bars`: per target, source-only / teacher / blend / student mAP, from a pipeline's metrics.json;
- `verification_picture`: positive/negative pair distance histograms and the ROC (`evaluate --verification`);
- `kd_distance_picture`: per target, the student's pairwise distances against its teacher's, before and after KD;
- `visualize_activation_maps`: where each model looks (attention of its final feature map) on the same images
  (`--visactmap`; the report: a teacher above its student).

`kdreid report RUN` (kdreid.report) gathers them into RUN/report.html.
"""

from kdreid.viz.actmap import activation_maps, visualize_activation_maps
from kdreid.viz.bars import pipeline_bars
from kdreid.viz.curves import training_curves
from kdreid.viz.histograms import dmmd_histograms, load_distances
from kdreid.viz.kd import kd_distance_picture, load_kd_distances
from kdreid.viz.ranking import rank_queries, visualize_ranked_results
from kdreid.viz.verification import verification_picture

__all__ = ["activation_maps", "dmmd_histograms", "kd_distance_picture", "load_distances", "load_kd_distances",
           "pipeline_bars", "rank_queries", "training_curves", "verification_picture", "visualize_activation_maps",
           "visualize_ranked_results"]
