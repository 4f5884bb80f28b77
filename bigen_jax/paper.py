"""The paper's reported figures (Huang et al., ACM MM 2021, on COCO; METHOD.md §8), for tables that put ours beside
them: ``TABLE2`` the headline comparison, ``TABLE1`` the ablation rows of ``configs/ablations.py``.

The paper's scales: BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE and R-precision x100; CLIPScore x100 with OpenAI's CLIP;
FID with Inception features. The demo world's figures are x1, its CLIPScore uses the demo CLIP and its FID the scene
recogniser's features, so only the direction of a difference compares.
"""

# Table 2: model -> measure -> figure. R-precision "hard / easy" as METHOD.md gives them, ranked by ViLBERT-MT or CLIP.
TABLE2 = {
    "Ours": {"BLEU-4": 37.3, "METEOR": 28.2, "ROUGE-L": 57.9, "CIDEr-D": 122.6, "SPICE": 21.9, "CLIPScore": 77.2,
             "FID": 29.9, "R-precision hard (ViLBERT)": 37.7, "R-precision easy (ViLBERT)": 59.2,
             "R-precision hard (CLIP)": 40.7, "R-precision easy (CLIP)": 69.9},
    "X-LXMERT": {"CIDEr-D": 41.0, "CLIPScore": 72.9, "FID": 37.0},
    "X-LXMERT fine-tuned": {"CIDEr-D": 100.9, "FID": 33.9},
}

# Table 1: ablation row of configs/ablations.py -> what the paper reports for it.
TABLE1 = {"full": "CIDEr 122.6, CLIPScore 77.2, FID 29.9", "two_model": "equal to full (456M parameters)",
          "dense_only": "T2I FID 34.9", "discrete_only": "I2T CIDEr 114.3",
          "no_sequence_level": "CIDEr 107.9, FID 33.5", "no_clip_loss": "CLIPScore 72.5, FID 40.1"}
