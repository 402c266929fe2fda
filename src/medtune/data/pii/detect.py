"""Recognizers for every kind of personal information, and `find_pii`, which merges their spans.

Each recognizer yields `Span`s; where two overlap, the one from the earlier recognizer in `RECOGNIZERS` wins
(an e-mail's digits are not a phone number; a valid ID number is not a bank card).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from stdnum import luhn
from stdnum.cn import ric

# kind -> the placeholder's label; the report and the placeholders use these names
PLACEHOLDERS = {
    "name": "姓名", "phone": "电话", "id_card": "身份证号", "record_no": "病历号", "email": "邮箱",
    "address": "地址", "birth_date": "出生日期", "bank_card": "银行卡号", "age": "年龄",
}
KINDS = tuple(PLACEHOLDERS)


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str


NOT_ALNUM_BEFORE, NOT_ALNUM_AFTER = r"(?<![0-9A-Za-z])", r"(?![0-9A-Za-z])"
SEP = r"[ \t]*[：:][ \t]*|[ \t]*(?:为|是)[：:]?[ \t]*|[ \t]*"  # between a cue word and its value

# --- resident ID numbers -------------------------------------------------------------------------------------
# First two digits: province-level codes of GB/T 2260 (a fact list), which keeps random 18-digit numbers out.
PROVINCES = {11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46, 50, 51, 52, 53,
             54, 61, 62, 63, 64, 65, 71, 81, 82, 83, 91}
ID_18 = re.compile(NOT_ALNUM_BEFORE + r"\d{17}[\dXx]" + NOT_ALNUM_AFTER)
ID_15 = re.compile(NOT_ALNUM_BEFORE + r"\d{15}" + NOT_ALNUM_AFTER)
ID_CUE = re.compile(r"(?:身份证|证件|公民身份)(?:号码|号)?(?:" + SEP + r")$")


def _plausible_birth(year: int, month: int, day: int) -> bool:
    try:
        born = datetime.date(year, month, day)
    except ValueError:
        return False
    return datetime.date(1890, 1, 1) <= born <= datetime.date.today()


def is_resident_id(number: str) -> bool:
    """18 digits (the last may be X) with a known province, a real birth date and a correct check digit."""
    if len(number) != 18 or int(number[:2]) not in PROVINCES:
        return False
    if not _plausible_birth(int(number[6:10]), int(number[10:12]), int(number[12:14])):
        return False
    return ric.calc_check_digit(number) == number[17].upper()  # (stdnum skips the last digit itself)


def is_old_resident_id(number: str) -> bool:
    """The 15-digit form issued before 1999: province, YYMMDD of a 19xx birth date, no check digit."""
    return (len(number) == 15 and int(number[:2]) in PROVINCES
            and _plausible_birth(1900 + int(number[6:8]), int(number[8:10]), int(number[10:12])))


def id_shaped(number: str) -> bool:
    """18 digits with a province code and a birth date where an ID has them (the check digit aside): without a
    card cue word such a number is a mistyped ID or a barcode, not a bank card (UnionPay's 62 is also Gansu's)."""
    return (len(number) == 18 and int(number[:2]) in PROVINCES
            and _plausible_birth(int(number[6:10]), int(number[10:12]), int(number[12:14])))


def find_id_numbers(text: str) -> Iterator[Span]:
    """Valid IDs anywhere; an 18-digit number that fails the check digit only right after an ID cue word (a
    mistyped ID is still someone's ID; elsewhere such numbers are specimen barcodes, lot or invoice numbers)."""
    for match in ID_18.finditer(text):
        number = match.group()
        if is_resident_id(number) or ID_CUE.search(text, max(0, match.start() - 12), match.start()):
            yield Span(match.start(), match.end(), "id_card")
    for match in ID_15.finditer(text):
        if is_old_resident_id(match.group()):
            yield Span(match.start(), match.end(), "id_card")


# --- bank cards ----------------------------------------------------------------------------------------------
CARD = re.compile(NOT_ALNUM_BEFORE + r"\d{4}(?:[ -]?\d{4}){3}(?:[ -]?\d{1,3})?" + NOT_ALNUM_AFTER)
CARD_CUE = re.compile(r"(?:卡号|银行卡|储蓄卡|信用卡|借记卡|账号|帐号|账户|帐户|开户行?)[^，。；\n]{0,8}$")
# Issuer prefixes and lengths (UnionPay 62 and the older domestic 60/95/9x prefixes, Visa, Mastercard, JCB).
CARD_PREFIXES = ((re.compile(r"62|60|9[0-9]"), range(16, 20)), (re.compile(r"4"), (16, 19)),
                 (re.compile(r"5[1-5]|2[2-7]"), (16,)), (re.compile(r"35"), (16,)))


def _issued_card(digits: str) -> bool:
    return any(prefix.match(digits) and len(digits) in lengths for prefix, lengths in CARD_PREFIXES)


def find_bank_cards(text: str) -> Iterator[Span]:
    """16-19 digits (groups of four allowed) passing Luhn, with a known issuer prefix or after a card cue."""
    for match in CARD.finditer(text):
        digits = re.sub(r"[ -]", "", match.group())
        if not 16 <= len(digits) <= 19 or not luhn.is_valid(digits):
            continue
        cued = CARD_CUE.search(text, max(0, match.start() - 16), match.start())
        if cued or (_issued_card(digits) and not id_shaped(digits)):
            yield Span(match.start(), match.end(), "bank_card")


# --- phones ---------------------------------------------------------------------------------------------------
MOBILE = re.compile(r"(?<![0-9A-Za-z+])(?:\+?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}" + NOT_ALNUM_AFTER)
# Landlines need an area code written apart (0xx-, (0xx), 0xx ) so that bare digit runs are not taken for them.
LANDLINE = re.compile(r"(?<![0-9A-Za-z])(?:[(（]0\d{2,3}[)）][ -]?|0\d{2,3}[ -])[2-9]\d{6,7}(?:(?:-|转)\d{1,5})?"
                      + NOT_ALNUM_AFTER)
PHONE_CUE = re.compile(r"(?:电话|手机|座机|联系方式|联系电话|Tel|TEL|tel|致电|拨打)(?:号码|号)?(?:" + SEP + r")$")
BARE_LANDLINE = re.compile(NOT_ALNUM_BEFORE + r"(?:0\d{2,3})?[2-9]\d{6,7}" + NOT_ALNUM_AFTER)


def find_phones(text: str) -> Iterator[Span]:
    for pattern in (MOBILE, LANDLINE):
        for match in pattern.finditer(text):
            yield Span(match.start(), match.end(), "phone")
    for match in BARE_LANDLINE.finditer(text):  # written without separators: only right after a phone cue
        if PHONE_CUE.search(text, max(0, match.start() - 10), match.start()):
            yield Span(match.start(), match.end(), "phone")


# --- record numbers -------------------------------------------------------------------------------------------
RECORD_NO = re.compile(
    r"(?:住院号码?|住院流水号|病案号|病历号|门诊号|门诊病历号|急诊号|就诊号|就诊卡号|诊疗卡号|登记号|档案号|病理号|"
    r"影像号|检查号|患者ID|病人ID|ID号|MRN|病案首页编号)(?:" + SEP + r")"
    r"([A-Za-z]{0,4}[-_]?\d[\dA-Za-z_-]{3,19})" + NOT_ALNUM_AFTER)


def find_record_numbers(text: str) -> Iterator[Span]:
    for match in RECORD_NO.finditer(text):
        if sum(c.isdigit() for c in match.group(1)) >= 4:
            yield Span(match.start(1), match.end(1), "record_no")


# --- e-mail ---------------------------------------------------------------------------------------------------
EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")


def find_emails(text: str) -> Iterator[Span]:
    for match in EMAIL.finditer(text):
        yield Span(match.start(), match.end(), "email")


# --- dates of birth -------------------------------------------------------------------------------------------
DATE = r"(?:19|20)\d{2}(?:[ \t]*年[ \t]*\d{1,2}[ \t]*月(?:[ \t]*\d{1,2}[ \t]*[日号])?|[-/.]\d{1,2}[-/.]\d{1,2})"
ONSET_AFTER = r"(?![ \t]*(?:起病|发病|出现|开始|入院|就诊|住院|手术|确诊|诊断|受伤|感染))"  # 张春生于3月5日起病
BIRTH_BEFORE = re.compile(r"(?:出生日期|出生年月日?|生日|出生于|生于|出生时间|出生|DOB|D\.O\.B\.?)(?:" + SEP + r")("
                          + DATE + r")(?!\d)" + ONSET_AFTER)
BIRTH_AFTER = re.compile(r"(?<!\d)(" + DATE + r")[ \t]*(?:出生|生人|生(?![化活理长物存育产殖命效]))")


def find_birth_dates(text: str) -> Iterator[Span]:
    for pattern in (BIRTH_BEFORE, BIRTH_AFTER):
        for match in pattern.finditer(text):
            yield Span(match.start(1), match.end(1), "birth_date")


# --- ages over 89 ---------------------------------------------------------------------------------------------
CHINESE_DIGITS = "一二三四五六七八九"
AGE = re.compile(r"(?<![\d.≥≤><＞＜])(\d{2,3})[ \t]*(?:周岁|岁)(?!以上|以下|及以上|及以下|以内|以后|以前)")
AGE_FIELD = re.compile(r"年龄(?:" + SEP + r")(\d{2,3})(?![\d.]|[ \t]*(?:岁|周岁|个月|月|天|日|kg|cm))")
CHINESE_AGE = re.compile(r"(九十[一二三四五六七八九]?|一百(?:零[一二三四五六七八九]|[一二三]十[一二三四五六七八九]?|"
                         r"[一二三]十)?)(?:周岁|岁)(?!以上|以下|及以上|及以下|以内)")
OLDEST = 130  # a larger "age" is a misreading (a value, a count), not a person


def find_old_ages(text: str) -> Iterator[Span]:
    """Ages above 89 (HIPAA's safe-harbour rule: such ages are rare enough to identify a person)."""
    for match in AGE.finditer(text):
        if 89 < int(match.group(1)) <= OLDEST:
            yield Span(match.start(), match.end(), "age")
    for match in AGE_FIELD.finditer(text):
        if 89 < int(match.group(1)) <= OLDEST:
            yield Span(match.start(1), match.end(1), "age")
    for match in CHINESE_AGE.finditer(text):
        yield Span(match.start(), match.end(), "age")


# --- addresses ------------------------------------------------------------------------------------------------
ADDRESS_CUE = re.compile(r"(?:家庭住址|现住址|户籍地址|居住地址|联系地址|通讯地址|工作单位地址|住址|地址|现住|家住|户籍地|"
                         r"居住地|居住于|住在)(?:" + SEP + r")")
ADDRESS_BODY = re.compile(r"[\u4e00-\u9fff0-9A-Za-z#\-－（）()]{2,48}")
ADDRESS_END = re.compile(r".*(?:号楼|号院|号|室|栋|幢|单元|楼|层|弄|村|组|巷|胡同|里|苑|园|小区|大厦|公寓|路|街|大道|"
                         r"镇|乡|区|县|市|屯)", re.S)
ADDRESS_MARK = re.compile(r"省|自治区|市|区|县|镇|乡|村|路|街|道|巷|弄|胡同|小区|号")
# A street and its number, for addresses written without a cue word (e.g. "在中山路3号家中跌倒").
NOT_ADDRESS_BEFORE = "在于从到住至往去自的是为了与及向经被把将送由距离近旁边附"
STREET_NUMBER = re.compile(r"(?:(?![" + NOT_ADDRESS_BEFORE + r"])[\u4e00-\u9fff]){1,8}?(?:路|大街|街|大道|巷|胡同|弄)"
                           r"\d+(?:-\d+)?号(?:院|楼)?(?:\d+(?:号楼|栋|幢|单元|层|室|楼))*")


def find_cued_addresses(text: str) -> Iterator[Span]:
    for cue in ADDRESS_CUE.finditer(text):
        body = ADDRESS_BODY.match(text, cue.end())
        if not body:
            continue
        end = ADDRESS_END.match(body.group())
        if end and ADDRESS_MARK.search(end.group()):
            yield Span(body.start(), body.start() + end.end(), "address")


def find_street_addresses(text: str) -> Iterator[Span]:
    for match in STREET_NUMBER.finditer(text):
        start = match.start()
        while start > 0 and start > match.start() - 24 and "\u4e00" <= text[start - 1] <= "\u9fff" \
                and text[start - 1] not in NOT_ADDRESS_BEFORE:
            start -= 1  # walk back over the city and district in front of the street
        yield Span(start, match.end(), "address")


def _names(text: str) -> Iterator[Span]:
    from medtune.data.pii.names import find_names

    return find_names(text)


# Earlier recognizers win overlaps. Those that need a digit are skipped on text without one (most prose).
NEED_DIGITS = (find_id_numbers, find_bank_cards, find_record_numbers, find_phones, find_birth_dates,
               find_street_addresses)
RECOGNIZERS: tuple[Callable[[str], Iterator[Span]], ...] = (
    find_emails, *NEED_DIGITS[:5], find_cued_addresses, NEED_DIGITS[5], find_old_ages, _names,
)
DIGIT = re.compile(r"\d")
# Full-width digits, plus, minus, X and the ideographic space (电话：１３８１２３４５６７８), one character for one, so the
# patterns see ASCII and every span stays valid in the original text.
FULL_WIDTH = str.maketrans("０１２３４５６７８９＋－Ｘｘ\u3000", "0123456789+-Xx ")


def ascii_digits(text: str) -> str:
    return text.translate(FULL_WIDTH)


def find_pii(text: str) -> list[Span]:
    """Non-overlapping spans of personal information in `text`, in order."""
    text = ascii_digits(text)
    taken: list[Span] = []
    has_digits = DIGIT.search(text) is not None
    for recognizer in RECOGNIZERS:
        if recognizer in NEED_DIGITS and not has_digits or recognizer is find_emails and "@" not in text:
            continue
        for span in recognizer(text):
            if all(span.end <= other.start or span.start >= other.end for other in taken):
                taken.append(span)
    return sorted(taken, key=lambda s: s.start)
