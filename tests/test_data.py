"""Tests for qspjax.data: the trial files, their validation, tidy views and the ``trials`` CLI.

The seed-comparison tests read the numbers straight out of the review's text
(shared/seeds/000_a842a0d63471a240.txt), not from a copy, by locating the table, the arm's row
and the column.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import yaml

from qspjax.cli import main
from qspjax.data import NOT_REACHED, count_from_pct, load_trials
from qspjax.errors import QSPValidationError
from qspjax.regimen import parse_regimen

SEED = Path(__file__).resolve().parents[1].parent / "shared" / "seeds" / "000_a842a0d63471a240.txt"

EXPECTED_NCT_IDS = {
    # Tables 1 / 2: resectable
    "NCT04271384", "NCT02904954", "NCT03694236",
    # Tables 3 / 4: early-stage unresectable
    "NCT03148327", "NCT02599454", "NCT03110978",
    # Tables 5 / 6: locally advanced (NICOLAS printed NCT0243408 in Table 5)
    "NCT02125461", "NCT02343952", "NCT02621398", "NCT03631784", "NCT02525757", "NCT02434081",
    "NCT03102242", "NCT03523702", "NCT03663166", "NCT03087760",
    # Tables 7 / 8: advanced
    "NCT02492568", "NCT02444741", "NCT03035890", "NCT03644823", "NCT02221739", "NCT03812549",
    "NCT03223155", "NCT03168464", "NCT02888743",
}
MULTI_ARM_TRIALS = {
    "NCT02904954": 2,  # durvalumab +/- SBRT before surgery
    "NCT03110978": 2,  # SBRT +/- nivolumab
    "NCT02125461": 2,  # PACIFIC
    "NCT03631784": 2,  # KEYNOTE-799 cohorts A and B
    "NCT02525757": 2,  # DETERRED parts 1 and 2
    "NCT02492568": 2,  # PEMBRO-RT
    "NCT02444741": 2,  # MDACC
    "NCT03223155": 3,  # COSINR concurrent, sequential, expansion
    "NCT02888743": 3,  # dual ICI, + HFRT, + LDRT
}


@pytest.fixture(scope="module")
def trials():
    return load_trials()


# ---------------------------------------------------------------------------------------------
# Seed reader (independent of the YAML files)
# ---------------------------------------------------------------------------------------------
def _seed_table(number: int) -> tuple[list[str], list[list[str]]]:
    """Header and rows of Table ``number``: cells start with a tab; untabbed lines continue a cell."""
    assert SEED.is_file(), f"seed text not found at {SEED} (shared/ must sit beside the repository)"
    lines = SEED.read_text(encoding="utf-8").split("\n")
    start = next(i for i, line in enumerate(lines) if re.match(rf"Table\s{number}\s\|", line))
    rows, current = [], None
    for line in lines[start + 1:]:
        if line.startswith("The bold text"):
            break
        if not line:
            if current:
                rows.append(current)
            current = None
        elif line.startswith("\t"):
            current = (current or []) + [line[1:]]
        else:
            current[-1] += "\n" + line
    return rows[0], rows[1:]


_SEED_CACHE: dict[int, tuple[list[str], list[list[str]]]] = {}


def seed_cell(table: int, row_text: str, column: str) -> str:
    """The cell of ``column`` in the row whose NCT; Treatment; Arm cells read ``row_text``."""
    if table not in _SEED_CACHE:
        _SEED_CACHE[table] = _seed_table(table)
    header, rows = _SEED_CACHE[table]
    key_columns = [header.index(c) for c in ("NCT", "Treatment", "Arm")]
    matches = [r for r in rows
               if "; ".join(" ".join(r[i].split()) for i in key_columns) == row_text]
    assert len(matches) == 1, f"Table {table}: {len(matches)} rows match {row_text!r}"
    return matches[0][header.index(column)]


def first_number(text: str, after: str = "") -> float:
    """The first number in ``text`` following the regex ``after`` (decimal comma or dot)."""
    m = re.search(after + r"\s*(\d+(?:[.,]\d+)?)", text)
    assert m, f"no number after {after!r} in {text!r}"
    return float(m.group(1).replace(",", "."))


N_COLUMN = {2: "N", 4: "no. of patients", 6: "N", 8: "N"}
RESPONSE_COLUMN = {2: "Response rate (%) [95% CI]", 6: "Response rate (%)", 8: "RR (%)"}
ORR_COLUMN = {2: "Response rate (%) [95% CI]", 6: "ORR and DCR (%)", 8: "ORR or DCR (%)"}
MEDIAN_PFS_COLUMN = {4: "% PFS or EFS (range)", 6: "Median PFS (months)", 8: "Median PFS (%) (months)"}
LANDMARK_PFS_COLUMN = {2: "PFS or DFS (%) [95% CI]", 4: "% PFS or EFS (range)", 6: "PFS (%) (range or 95% CI)"}


def _collected_arms():
    """Arms for parametrising at collection time; a broken file fails the tests, not the collection."""
    try:
        return load_trials().arms
    except QSPValidationError:
        return ()


def _arms_where(predicate=lambda arm: True):
    return [pytest.param(a.arm_id, id=a.arm_id) for a in _collected_arms() if predicate(a)]


def _arms_with(attribute: str):
    return _arms_where(lambda a: getattr(a, attribute) is not None)


# ---------------------------------------------------------------------------------------------
# Completeness
# ---------------------------------------------------------------------------------------------
def test_all_25_trials_and_36_arms_are_present(trials):
    assert {t.nct_id for t in trials.trials} == EXPECTED_NCT_IDS
    assert len(trials.trials) == 25
    assert len(trials.arms) == 36
    assert len({a.arm_id for a in trials.arms}) == 36


@pytest.mark.parametrize("nct_id", sorted(EXPECTED_NCT_IDS))
def test_each_trial_has_the_arm_count_of_its_outcome_table(trials, nct_id):
    assert len(trials.get_trial(nct_id).arms) == MULTI_ARM_TRIALS.get(nct_id, 1)


def test_arms_per_outcome_table_match_the_seed(trials):
    for table in (2, 4, 6, 8):
        _, rows = _seed_table(table)
        assert sum(a.source.table == table for a in trials.arms) == len(rows)


def test_every_arm_source_row_exists_in_the_seed(trials):
    for a in trials.arms:
        assert seed_cell(a.source.table, a.source.row, "Arm") in ("CTRL", "EXP")


def test_nicolas_keeps_the_misprinted_id_and_uses_the_corrected_one(trials):
    nicolas = trials.get_trial("NCT02434081")
    assert nicolas.name == "NICOLAS"
    assert nicolas.nct_id_printed == "NCT0243408"
    assert any("NCT0243408" in n for n in nicolas.notes)
    header, rows = _seed_table(5)
    assert any(re.match(r"NCT0243408\b", r[0]) for r in rows)  # the misprint really is in the seed


def test_settings_follow_the_description_tables(trials):
    expected = {1: "resectable", 3: "early_stage", 5: "locally_advanced", 7: "advanced"}
    counts = {}
    for t in trials.trials:
        assert t.setting == expected[t.source.table]
        counts[t.setting] = counts.get(t.setting, 0) + 1
    assert counts == {"resectable": 3, "early_stage": 3, "locally_advanced": 10, "advanced": 9}


# ---------------------------------------------------------------------------------------------
# Numbers against the seed text
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arm_id", _arms_where())
def test_arm_n_matches_the_seed(trials, arm_id):
    arm = trials.get_arm(arm_id)
    cell = seed_cell(arm.source.table, arm.source.row, N_COLUMN[arm.source.table])
    assert arm.n == int(cell)


@pytest.mark.parametrize("arm_id", _arms_with("orr_pct"))
def test_arm_orr_matches_the_seed(trials, arm_id):
    arm = trials.get_arm(arm_id)
    cell = seed_cell(arm.source.table, arm.source.row, ORR_COLUMN[arm.source.table])
    assert arm.orr_pct == first_number(cell, r"ORR:?")


@pytest.mark.parametrize("arm_id", _arms_with("cr_pct"))
def test_arm_cr_and_pr_match_the_seed(trials, arm_id):
    arm = trials.get_arm(arm_id)
    cell = seed_cell(arm.source.table, arm.source.row, RESPONSE_COLUMN[arm.source.table])
    assert arm.cr_pct == first_number(cell, r"\bCR:?")
    assert arm.pr_pct == first_number(cell, r"\bPR:?")


@pytest.mark.parametrize("arm_id", _arms_with("median_pfs_months"))
def test_arm_median_pfs_matches_the_seed(trials, arm_id):
    arm = trials.get_arm(arm_id)
    cell = seed_cell(arm.source.table, arm.source.row, MEDIAN_PFS_COLUMN[arm.source.table])
    if arm.source.table == 4:  # inside the PFS cell: "Median 25.9 months"
        assert arm.median_pfs_months == first_number(cell, r"Median")
    elif arm.median_pfs_months == NOT_REACHED:
        assert cell.split()[0] == NOT_REACHED
    else:
        assert arm.median_pfs_months == first_number(cell)


@pytest.mark.parametrize("arm_id", _arms_where(
    lambda a: a.source.table in LANDMARK_PFS_COLUMN
    and any(lm.endpoint in ("pfs", "efs") and lm.months == 12 for lm in a.landmarks)))
def test_arm_one_year_pfs_matches_the_seed(trials, arm_id):
    arm = trials.get_arm(arm_id)
    landmark = next(lm for lm in arm.landmarks if lm.endpoint in ("pfs", "efs") and lm.months == 12)
    cell = seed_cell(arm.source.table, arm.source.row, LANDMARK_PFS_COLUMN[arm.source.table])
    assert landmark.pct == first_number(cell, r"1-year:?")


def test_seed_comparisons_are_not_silently_empty():
    # A renamed field would empty a parametrisation and pass vacuously; pin how much is compared.
    n_by_table = {t: len(_arms_where(lambda a, t=t: a.source.table == t)) for t in (2, 4, 6, 8)}
    assert n_by_table == {2: 4, 4: 4, 6: 13, 8: 15}
    assert len(_arms_with("orr_pct")) >= 20
    assert len(_arms_with("cr_pct")) >= 20
    assert len(_arms_with("median_pfs_months")) >= 20
    assert {a.source.table for a in _collected_arms() if a.orr_pct is not None} == {2, 6, 8}
    assert {a.source.table for a in _collected_arms() if a.median_pfs_months is not None} == {4, 6, 8}


def test_pacific_values_are_as_printed(trials):
    durva = trials.get_arm("NCT02125461:crt_durva")
    assert (durva.n, durva.orr_pct, durva.median_pfs_months, durva.median_os_months) == (476, 28.4, 16.9, 47.5)
    assert durva.median_pfs_ci == (13.0, 18.1)
    five_year_os = next(lm for lm in durva.landmarks if lm.endpoint == "os" and lm.months == 60)
    assert (five_year_os.pct, five_year_os.ci) == (42.9, (38.2, 47.4))


# ---------------------------------------------------------------------------------------------
# Conventions: NR, absent, zero, derived counts
# ---------------------------------------------------------------------------------------------
def test_not_reached_is_distinguished_from_not_given(trials):
    cohort_b = trials.get_arm("NCT03631784:cohort_b")
    assert cohort_b.median_os_months == NOT_REACHED
    assert cohort_b.median_os_ci == (41.1, NOT_REACHED)
    mdacc = trials.get_arm("NCT02444741:pembro")  # median OS printed '–'
    assert mdacc.median_os_months is None
    endpoints = trials.endpoints_table()
    row = endpoints[(endpoints.arm_id == cohort_b.arm_id) & (endpoints.endpoint == "median_os")].iloc[0]
    assert math.isnan(row.value) and row.value_text == NOT_REACHED and row.ci_hi == math.inf
    assert endpoints[(endpoints.arm_id == mdacc.arm_id) & (endpoints.endpoint == "median_os")].empty


def test_values_not_given_are_absent_never_zero(trials):
    assert trials.get_arm("NCT02343952:crt_pembro").orr_pct is None  # blank response cells
    assert trials.get_arm("NCT04271384:sbrt_nivo").male_pct is None  # printed '-'
    assert trials.get_arm("NCT02492568:pembro").smokers_pct is None  # printed '>80', a bound
    assert trials.get_arm("NCT02904954:durva").cr_pct == 0  # printed 0 stays 0


def test_derived_counts_equal_rounded_percentages_of_n(trials):
    for a in trials.arms:
        for count, pct in (("responders", a.orr_pct), ("cr_n", a.cr_pct), ("pr_n", a.pr_pct),
                           ("sd_n", a.sd_pct), ("pd_n", a.pd_pct)):
            got = getattr(a, count)
            assert got == (None if pct is None else count_from_pct(pct, a.n)), (a.arm_id, count)
    assert trials.get_arm("NCT02492568:sbrt_pembro").responders == 17  # 47.2% of 36
    assert trials.get_arm("NCT02125461:crt_placebo").responders == 38  # 16% of 237


def test_count_from_pct_rounds_half_up():
    assert count_from_pct(50, 1) == 1  # round() would give 0
    assert count_from_pct(22.5, 40) == 9
    assert count_from_pct(0, 30) == 0


def test_cr_plus_pr_is_within_tolerance_of_orr_in_every_arm(trials):
    for a in trials.arms:
        if None not in (a.orr_pct, a.cr_pct, a.pr_pct):
            assert abs(a.cr_pct + a.pr_pct - a.orr_pct) <= 1.5, a.arm_id


# ---------------------------------------------------------------------------------------------
# Tidy views and look-ups
# ---------------------------------------------------------------------------------------------
def test_arms_table_has_one_row_per_arm(trials):
    table = trials.arms_table()
    assert len(table) == 36 and table.arm_id.is_unique
    for column in ("nct_id", "arm_id", "label", "role", "setting", "n", "orr_pct", "responders",
                   "median_pfs_months", "median_pfs_nr", "follow_up_days"):
        assert column in table.columns
    row = table.set_index("arm_id").loc["NCT02492568:sbrt_pembro"]
    assert (row.n, row.orr_pct, row.responders, row.setting) == (36, 47.2, 17, "advanced")


def test_endpoints_table_is_petab_shaped(trials):
    table = trials.endpoints_table()
    assert list(table.columns[:3]) == ["nct_id", "arm_id", "endpoint"]
    for column in ("value", "n", "ci_lo", "ci_hi", "time_months", "source_table"):
        assert column in table.columns
    percent = table[table.unit == "%"]
    assert percent.value.between(0, 100).all()
    landmarks = table[table.endpoint.str.endswith("_rate")]
    assert landmarks.time_months.notna().all() and (landmarks.time_months > 0).all()
    assert set(table.arm_id) <= {a.arm_id for a in trials.arms}
    orr = table[(table.arm_id == "NCT02125461:crt_placebo") & (table.endpoint == "orr")].iloc[0]
    assert (orr.value, orr.n, orr.ci_lo, orr.ci_hi, orr.source_table) == (16, 237, 11.3, 21.6, 6)


def test_get_arm_returns_the_arm_and_refuses_unknown_ids(trials):
    assert trials.get_arm("NCT03223155:sequential").n == 19
    with pytest.raises(QSPValidationError) as err:
        trials.get_arm("NCT03223155:nope")
    assert err.value.field == "arm_id" and "NCT03223155:sequential" in err.value.allowed


# ---------------------------------------------------------------------------------------------
# Regimens
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arm_id", _arms_where())
def test_every_arm_regimen_parses(trials, arm_id):
    arm = trials.get_arm(arm_id)
    regimen = parse_regimen(arm.regimen, source=arm_id)
    assert regimen.name == arm.regimen["name"]
    assert arm.regimen_assumptions
    assert arm.follow_up_days > arm.outcome_origin_day


def test_regimens_follow_the_printed_schedules(trials):
    pembro_rt = parse_regimen(trials.get_arm("NCT02492568:sbrt_pembro").regimen)
    assert pembro_rt.rt[0].days == (0, 2, 4) and pembro_rt.rt[0].dose_per_fraction_gy == 8
    assert pembro_rt.ici[0].cycles == 35 and pembro_rt.ici[0].start_day == 7
    control = parse_regimen(trials.get_arm("NCT02492568:pembro").regimen)
    assert control.rt == ()
    ldrt = parse_regimen(trials.get_arm("NCT02888743:ldrt_durva_treme").regimen)
    assert sum(c.dose_per_fraction_gy * c.fractions for c in ldrt.rt) == pytest.approx(8.0)


# ---------------------------------------------------------------------------------------------
# Validation of bad files
# ---------------------------------------------------------------------------------------------
GOOD_FILE = "NCT02492568.yaml"  # PEMBRO-RT: two arms with ORR, CR, PR, medians and landmarks


def _write_bad_copy(tmp_path: Path, edit) -> Path:
    source = Path(__file__).resolve().parents[1] / "configs" / "trials" / GOOD_FILE
    doc = yaml.safe_load(source.read_text(encoding="utf-8"))
    edit(doc)
    directory = tmp_path / "trials"
    directory.mkdir()
    (directory / GOOD_FILE).write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return directory


def test_a_good_copy_loads(tmp_path):
    directory = _write_bad_copy(tmp_path, lambda doc: None)
    assert [a.arm_id for a in load_trials(directory).arms] == ["NCT02492568:pembro", "NCT02492568:sbrt_pembro"]


def _set(path: str, value):
    def edit(doc):
        *parents, last = path.split(".")
        target = doc
        for p in parents:
            target = target[int(p)] if p.isdigit() else target[p]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return edit


_DELETE = object()


def _duplicate_arm_id(doc):
    doc["arms"][1]["arm_id"] = doc["arms"][0]["arm_id"]


BAD_FILES = {
    "percentage_above_100": (_set("arms.0.orr_pct", 120), "arms[0].orr_pct", "0–100"),
    "unknown_key": (_set("arms.1.orr_pcnt", 47.2), "arms[1].orr_pcnt", "unknown key"),
    "unknown_top_level_key": (_set("phasee", "2"), "phasee", "unknown key"),
    "missing_n": (_set("arms.0.n", _DELETE), "arms[0].n", "required"),
    "n_not_positive": (_set("arms.0.n", 0), "arms[0].n", "integer >= 1"),
    "n_not_integer": (_set("arms.0.n", 40.5), "arms[0].n", "integer"),
    "cr_plus_pr_inconsistent_with_orr": (_set("arms.1.cr_pct", 20), "arms[1].orr_pct", "CR + PR"),
    "derived_count_wrong": (_set("arms.1.derived.responders", 18), "arms[1].derived.responders", "= 17"),
    "duplicate_arm_id": (_duplicate_arm_id, "arms[1].arm_id", "duplicate"),
    "bad_nct_id": (_set("nct_id", "NCT0249256"), "nct_id", "8 digits"),
    "not_reached_in_a_percentage": (_set("arms.0.orr_pct", "NR"), "arms[0].orr_pct", "percentage"),
    "interval_reversed": (_set("arms.0.median_os_ci", [13.9, 6.0]), "arms[0].median_os_ci", "lower bound"),
    "interval_without_its_value": (_set("arms.0.median_os_months", _DELETE), "arms[0].median_os_ci", "needs its value"),
    "landmark_over_100": (_set("arms.0.landmarks.0.pct", 135), "arms[0].landmarks[0].pct", "0–100"),
    "unknown_setting": (_set("setting", "metastatic"), "setting", "allowed values"),
    "unknown_role": (_set("arms.0.role", "placebo"), "arms[0].role", "allowed values"),
    "arm_from_another_trial": (_set("arms.0.arm_id", "NCT02125461:pembro"), "arms[0].arm_id", "this trial's id"),
    "regimen_missing": (_set("arms.0.regimen", _DELETE), "arms[0].regimen", "required"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_loader_rejects_bad_file_naming_the_field(tmp_path, case):
    edit, field, allowed_fragment = BAD_FILES[case]
    directory = _write_bad_copy(tmp_path, edit)
    with pytest.raises(QSPValidationError) as err:
        load_trials(directory)
    assert err.value.field == field
    assert allowed_fragment in err.value.allowed
    assert err.value.source.endswith(GOOD_FILE)
    assert field in str(err.value)


def test_loader_rejects_invalid_yaml(tmp_path):
    directory = tmp_path / "trials"
    directory.mkdir()
    (directory / GOOD_FILE).write_text("nct_id: [unclosed\n", encoding="utf-8")
    with pytest.raises(QSPValidationError) as err:
        load_trials(directory)
    assert err.value.field == "(file)"


def test_loader_rejects_a_file_named_after_another_trial(tmp_path):
    directory = _write_bad_copy(tmp_path, lambda doc: None)
    shutil.move(directory / GOOD_FILE, directory / "NCT02444741.yaml")
    with pytest.raises(QSPValidationError) as err:
        load_trials(directory)
    assert err.value.field == "nct_id" and "file name" in err.value.allowed


def test_loader_rejects_an_empty_directory(tmp_path):
    with pytest.raises(QSPValidationError):
        load_trials(tmp_path)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_trials_list_prints_every_trial(capsys):
    assert main(["trials", "list"]) == 0
    out = capsys.readouterr().out
    for nct_id in EXPECTED_NCT_IDS:
        assert nct_id in out
    assert "25 trials, 36 arms" in out


def test_cli_trials_show_prints_design_and_arms(capsys):
    assert main(["trials", "show", "NCT02125461"]) == 0
    out = capsys.readouterr().out
    assert "PACIFIC" in out and "NCT02125461:crt_durva" in out and "NCT02125461:crt_placebo" in out
    assert "ORR 28.4%" in out and "16.9 months" in out


def test_cli_trials_list_reads_another_directory(tmp_path, capsys):
    directory = _write_bad_copy(tmp_path, lambda doc: None)
    assert main(["trials", "list", "--dir", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "NCT02492568" in out and "NCT02125461" not in out and "1 trials, 2 arms" in out


def test_cli_trials_show_unknown_id_exits_2_listing_known_ids(capsys):
    assert main(["trials", "show", "NCT00000000"]) == 2
    err = capsys.readouterr().err
    assert "NCT00000000" in err and "NCT02125461" in err
