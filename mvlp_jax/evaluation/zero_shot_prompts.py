"""Zero-shot prompts per label for `--config.evaluator=zero_shot` (edit freely; labels are matched case-insensitively
with '_' read as a space).

`pair` is CheXzero's: "{label}" against "no {label}". `ensemble` is BioViL-style: several phrasings of the
finding and of its absence, whose embeddings are averaged (then renormalised); labels without an entry in
ENSEMBLES use the generic phrasings of TEMPLATES.
"""

TEMPLATES = (
    ("{label}", "findings consistent with {label}", "there is {label}"),
    ("no {label}", "no evidence of {label}", "there is no {label}"),
)

ENSEMBLES = {
    "no finding": (
        ("no acute cardiopulmonary process", "normal chest radiograph", "the lungs are clear"),
        ("acute cardiopulmonary process", "abnormal chest radiograph", "there is a finding"),
    ),
    "pneumonia": (
        ("pneumonia", "findings consistent with pneumonia", "focal consolidation concerning for pneumonia"),
        ("no pneumonia", "no focal consolidation", "no evidence of pneumonia"),
    ),
    "effusion": (
        ("pleural effusion", "small pleural effusion", "there is a pleural effusion"),
        ("no pleural effusion", "no effusion", "costophrenic angles are sharp"),
    ),
    "pneumothorax": (
        ("pneumothorax", "there is a pneumothorax", "small apical pneumothorax"),
        ("no pneumothorax", "there is no pneumothorax", "no evidence of pneumothorax"),
    ),
    "cardiomegaly": (
        ("cardiomegaly", "the heart is enlarged", "enlarged cardiac silhouette"),
        ("no cardiomegaly", "heart size is normal", "normal cardiac silhouette"),
    ),
    "edema": (
        ("pulmonary edema", "interstitial edema", "vascular congestion and edema"),
        ("no pulmonary edema", "no edema", "no vascular congestion"),
    ),
}


def prompts(label: str, style: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(positive prompts, negative prompts) of `label` for `style` ('pair' or 'ensemble')."""
    text = label.replace("_", " ").lower()
    if style == "pair":
        return (text,), (f"no {text}",)
    if text in ENSEMBLES:
        return ENSEMBLES[text]
    positive, negative = TEMPLATES
    return tuple(t.format(label=text) for t in positive), tuple(t.format(label=text) for t in negative)
