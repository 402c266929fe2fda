"""Chinese personal names of patients, doctors and relatives.

A name is looked for only where clinical text puts one: after a cue (患者, 主治医师：, 家属, 其子 …) or before a
title (…医生, …主任, …女士). The candidate must start with a known surname, and jieba (its bundled dictionary,
no model download) decides its extent and rejects ordinary words: after 患者 the characters 高热, 黄疸, 周身 or
平素 start with a surname but form a dictionary word that is not a name, so they are left alone. jieba's own
person tag (nr) is not used on its own: it tags drug and herb names such as 黄连素 and 何首乌 as names.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache

from medtune.data.pii.detect import Span

# Common surnames (a fact list: the most frequent single-character surnames in China, then compound ones).
SINGLE_SURNAMES = set(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔"
    "钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤常温康施文牛樊葛"
    "邢安齐易乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿关兰焦俞左柳甘祝包宁尚符舒阮柯纪梅童凌毕单季裴霍涂成苗谷盛曲翁冉骆蓝"
    "路游辛靳管柴蒙鲍华喻祁蒲房滕屈饶解牟艾尤阳时穆农司卓古吉缪简车项连芦麦褚娄窦戚岑景党宫费卜冷晏席卫米柏宗瞿桂"
    "全佟应臧闵苟邬边卞姬师和仇栾隋商刁沙荣巫寇桑郎甄丛仲虞敖巩明佘池查麻苑迟邝官封谈匡鞠惠荆乐冀郁胥南班储原栗燕"
    "楚鄢劳谌奚皮粟冼蔺楼盘满闻位厉伊仝区郜海阚花权强帅屠豆朴盖练廉禹井祖漆巴丰支卿国狄平计索宣晋相初门云容敬来扈"
    "晁芮都普阙浦戈伏鹿薄邸雍辜羊阿乌母裘亓修邰赫杭况那宿鲜印逯隆茹诸战慕危玉银亢嵇公哈湛宾戎勾茅利於呼居揭干但尉冶"
    "斯元束檀衣信展阴昝智幸奉植衡富尧闭由傅赖萧阎")
COMPOUND_SURNAMES = ("欧阳", "司马", "诸葛", "上官", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙", "宇文", "司徒",
                     "夏侯", "轩辕", "令狐", "端木", "南宫", "独孤", "西门", "澹台", "申屠", "太史", "闻人", "呼延")

# Surnames that are mostly everyday words in clinical text (患者应避免, 患者平卧, 时请医生): never taken as the
# start of a name. 于, 高, 黄, 周, 常, 易 … are too common as surnames for that: they start a name when jieba joins
# them to what follows (患者于秀兰, but 患者于|外院), and alone before a title only at the start of a clause or after
# a verb that takes a person (，高医生 / 请高医生, not 血压高|医生).
WORD_SURNAMES = set("时和向经由及与同以从到后前给对为在将被请问叫是有无不也都还又再才就便已尚多少全双左右上下应但那"
                    "平权麻")
FUNCTION_SURNAMES = WORD_SURNAMES | set("于高黄周曾常易严明门")
# jieba tags of words that are not given names (verbs, adverbs, prepositions, pronouns, numbers …)
WORD_TAGS = {"v", "vd", "vn", "vi", "d", "p", "c", "u", "r", "f", "m", "q", "ad", "l", "i", "s"}
# Characters that end a name: what clinical text puts right after one (患者张伟因…, 李静诉…, 家属王芳签字).
AFTER_NAME = set("因诉于在由以自今昨前后男女主现已经曾无有为是及和与等的之之来去到入出就住陪签说称述家患之同均也"
                 "年日岁病史既否并伴予行外当本我近夜晨午晚半科院室床")

BEFORE_CUES = (
    "患者姓名", "病人姓名", "姓名", "患者", "病人", "患儿", "病员", "孕妇", "产妇", "伤者", "主诉人", "病史陈述者",
    "陈述人", "代诉人", "主治医师", "主任医师", "副主任医师", "住院医师", "主管医师", "经治医师", "经治医生",
    "接诊医师", "接诊医生", "会诊医师", "上级医师", "责任护士", "护士", "医师", "医生", "记录者", "记录人", "签名",
    "签字", "审核人", "审核", "家属", "联系人", "监护人", "陪同人", "委托人", "其子", "其女", "其妻", "其夫", "其父",
    "其母", "其兄", "其弟", "其姐", "其妹", "之子", "之女", "儿子", "女儿", "妻子", "丈夫", "父亲", "母亲", "爱人",
    "配偶", "哥哥", "姐姐", "弟弟", "妹妹", "孙子", "孙女", "外孙", "老伴", "儿媳", "女婿", "我叫", "名叫", "本人",
    "其女儿", "其儿子", "其丈夫", "其妻子", "其父亲", "其母亲",
)
TITLES = ("副主任医师", "主任医师", "主治医师", "医生", "医师", "大夫", "主任", "护士长", "护士", "教授", "院长",
          "先生", "女士", "小姐", "老师", "阿姨", "大爷", "奶奶", "爷爷", "同志", "师傅")
BEFORE_CUE = re.compile("(?:" + "|".join(sorted(BEFORE_CUES, key=len, reverse=True)) + r")[ \t]*[：:]?[ \t]*(?:为)?")
TITLE = re.compile("|".join(sorted(TITLES, key=len, reverse=True)))
CJK = re.compile(r"[\u4e00-\u9fff]")

@lru_cache(maxsize=1)
def load_name_dictionary():
    """jieba, initialised once (it builds its dictionary cache on first use, about a second)."""
    import logging

    import jieba
    import jieba.posseg

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()  # thread-safe inside jieba
    return jieba


def _is_cjk(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff"


def surname_length(text: str) -> int:
    """1 or 2 for a surname at the start of `text`, 0 when it does not start with one."""
    if text[:2] in COMPOUND_SURNAMES:
        return 2
    return 1 if text[:1] in SINGLE_SURNAMES else 0


# jieba's dictionary also lists some people (李娜, 王建国) and tags a few common words as names (康复, 权衡); a
# word counts as an ordinary word when it is frequent enough, and when tagged as a name only when very frequent.
WORD_FREQUENCY, NAME_TAGGED_WORD_FREQUENCY = 20, 1000


@lru_cache(maxsize=65536)
def _word_tag(word: str) -> str:
    """jieba's part-of-speech tag of a dictionary word, '' for a word it does not know (or knows only as rare)."""
    jieba = load_name_dictionary()
    return jieba.posseg.dt.word_tag_tab.get(word, "x") if jieba.dt.FREQ.get(word, 0) >= WORD_FREQUENCY else ""


def _dictionary_word(word: str) -> bool:
    """An ordinary word rather than a person's name (高热, 平素, 值班, 康复)."""
    tag = _word_tag(word)
    if not tag:
        return False
    return not tag.startswith("nr") or load_name_dictionary().dt.FREQ[word] >= NAME_TAGGED_WORD_FREQUENCY


def _name_chars(text: str, start: int, limit: int) -> int:
    """How many characters from `start` could be a name: CJK, not past `limit`, stopping at a name-ending one."""
    end = start
    while end < min(len(text), start + limit) and _is_cjk(text[end]) and (end == start or text[end] not in AFTER_NAME):
        end += 1
    return end - start


# Tags of single characters that end given names (竹 ng, 华 ns, 伟 zg, 梅 nr, 军 n), unlike adjectives and verbs
# (痛 a, 吐 v).
NAME_CHAR_TAGS = {"ng", "ns", "zg", "j", "x", "n", "nz", "nr", "nrfg", "nrt"}


def _word_then_name_char(text: str, start: int, word: str, room: int) -> bool:
    """A three-character name whose first two characters happen to form a word (许国|华, 高爽|竹)."""
    if len(word) != 2 or room < 3 or surname_length(word) != 1:
        return False
    nxt = load_name_dictionary().lcut(text[start + 2:start + 5], HMM=False)[0]
    return (len(nxt) == 1 and _is_cjk(nxt) and nxt not in AFTER_NAME and nxt not in WORD_SURNAMES
            and (_word_tag(nxt) or "x") in NAME_CHAR_TAGS)  # not 严重|时: a function character


def name_after_cue(text: str, start: int) -> int:
    """Length of the name starting at `start` (right after a cue), or 0."""
    surname = surname_length(text[start:start + 2])
    room = _name_chars(text, start, surname + 2) if surname else 0
    if room <= surname or text[start:start + surname] in WORD_SURNAMES:
        return 0
    tokens = load_name_dictionary().lcut(text[start:start + surname + 4], HMM=True)
    first = tokens[0]
    if len(first) > surname:  # jieba joined the surname to what follows: a name, or a word such as 高热
        if len(first) > surname + 2:
            return 0  # longer than any name: a word or phrase (周围环境)
        if not _dictionary_word(first):
            length = min(len(first), room)
        elif _word_then_name_char(text, start, first, room):
            length = 3
        else:
            return 0
    else:  # the surname stands alone (刘|秀英), and what follows is a given name unless it is a word (周|身)
        given = tokens[1] if len(tokens) > 1 else ""
        if not given or not all(_is_cjk(c) for c in given) or _word_tag(given) in WORD_TAGS:
            return 0
        length = min(surname + len(given), room)
    if length == surname + 1 < room:
        # jieba cut a three-character name short: 欧阳明|华, or its last character joined to the next word (春|生于,
        # 德|胜诉) where that word ends with a character that follows names
        following = load_name_dictionary().lcut(text[start + length:start + length + 3], HMM=False)[0]
        length += len(following) == 1 or (len(following) == 2 and following[1] in AFTER_NAME)
    return length if length > surname else 0


# Words that clinical text puts right after 患者 and that start with a surname character: drugs, herbs and
# formulas, anatomy and findings (a fact list). jieba knows few of them, and tags some herbs as person names.
MEDICAL_WORDS = (
    "华法林 甘露醇 利福平 米非司酮 米索前列醇 舒张压 收缩压 包块 诸症 余症 戴眼镜 戴口罩 柴胡 柴胡疏肝散 黄芪 黄体酮 "
    "黄连素 黄连 何首乌 石膏 金刚烷胺 金银花 夏枯草 杜仲 牛黄 田七 陈皮 白芍 白术 甘草 甘草酸 党参 丁香 连翘 桂枝 葛根 "
    "蒲公英 车前子 房颤 房室 房间隔 甘油三酯 宫颈 宫缩 宫腔 宫内 单侧 单核 孟鲁司特 阿托伐他汀 阿司匹林 阿莫西林 阿卡波糖 "
    "阿替普酶 阿奇霉素 莫西沙星 雷贝拉唑 雷尼替丁 万古霉素 伏立康唑 曲马多 曲美他嗪 司美格鲁肽 安宫牛黄丸 龙胆泻肝汤 毛细血管 "
    "白细胞 白蛋白 叶酸 罗红霉素 罗哌卡因 林可霉素 杜冷丁 蒙脱石散 乌司他丁 巴曲酶 谷丙转氨酶 谷草转氨酶 麦氏点 秦艽 苏木 "
    "管型 贾第虫 胡桃夹 柏油样 易怒"
).split()
MEDICAL_WORD = re.compile("|".join(sorted(MEDICAL_WORDS, key=len, reverse=True)))
# Last characters of drug and preparation names (华法林, 利福平, 甘露醇, 黄体酮, 青霉素 …): after a cue and with no
# name boundary after them, such a candidate is a drug, not a person (a person with no boundary is rare).
# A dose or a pressure right after the candidate (患者莫西沙星0.4g, 患者舒张压105 mmHg): a drug or a measurement.
DOSE = re.compile(r"[ \t]*\d+(?:\.\d+)?[ \t]*(?:mg|g|ml|mL|μg|ug|IU|U|mmHg|mmol|片|粒|支)", re.I)
DRUG_ENDINGS = set("林平醇酮素唑胺汀酶肽酯碱钠钾钙片丸散汤膏液剂星坦啶嗪芬松")


def name_boundary(text: str, end: int) -> bool:
    """Whether what follows `end` is where a name stops (，、男, 因, 诉, a title, the end of the text)."""
    return (end >= len(text) or not _is_cjk(text[end]) or text[end] in AFTER_NAME
            or TITLE.match(text, end) is not None)


def plausible_name(text: str, start: int, length: int) -> bool:
    """A candidate after a cue is kept unless it is a medical word (患者华法林抗凝, 患者舒张压偏高, 患者戴眼镜) or
    followed by a dose, or, with no name boundary after it, a word jieba knows, a drug-like ending or the start of a longer word."""
    if MEDICAL_WORD.match(text, start) or DOSE.match(text, start + length):
        return False
    if name_boundary(text, start + length):
        return True
    candidate = text[start:start + length]
    jieba = load_name_dictionary()
    if jieba.dt.FREQ.get(candidate, 0) > 0 or candidate[-1] in DRUG_ENDINGS:
        return False
    return len(jieba.lcut(text[start:start + length + 3], HMM=False)[0]) <= length


def names_after_cues(text: str) -> Iterator[Span]:
    for cue in BEFORE_CUE.finditer(text):
        length = name_after_cue(text, cue.end())
        if length and plausible_name(text, cue.end(), length):
            yield Span(cue.end(), cue.end() + length, "name")


def _token_starts(text: str, start: int, end: int) -> dict[int, str]:
    """jieba's tokens of text[start:end], by the position each starts at."""
    tokens, position = {}, start
    for token in load_name_dictionary().lcut(text[start:end], HMM=False):  # dictionary words only: 请|白|桂兰, not 请白|桂兰
        tokens[position] = token
        position += len(token)
    return tokens


PERSON_VERBS = {"请", "由", "经", "找", "问", "向", "给", "和", "与", "及", "同", "跟", "让", "叫", "被", "邀请", "联系",
                "的", "是"}


def _clause_start(text: str, start: int, tokens: dict[int, str]) -> bool:
    """Whether a name may begin at `start`: after punctuation, or after a verb that takes a person (请|高医生)."""
    if start == 0 or not _is_cjk(text[start - 1]):
        return True
    return any(p + len(t) == start and t in PERSON_VERBS for p, t in tokens.items())


def name_before_title(text: str, title_start: int, title_end: int) -> int:
    """Start of the name written right before a title (张伟医生, 请王主任), or -1."""
    tokens = _token_starts(text, max(0, title_start - 6), title_end)
    for position, token in tokens.items():
        if position < title_start < position + len(token) and _dictionary_word(token):
            return -1  # the title is part of a word (班主任)
    for length in (4, 3, 2, 1):
        start = title_start - length
        candidate = text[start:title_start] if start >= 0 else ""
        surname = surname_length(candidate)
        if not surname or start not in tokens or not all(_is_cjk(c) for c in candidate):
            continue  # not a surname, or the middle of a word (值|班医生)
        inside = [t for p, t in tokens.items() if start <= p < title_start]
        if candidate[:surname] in WORD_SURNAMES or (inside[0] in FUNCTION_SURNAMES
                                             and not _clause_start(text, start, tokens)):
            continue  # 和|王医生, 那|医生, 血压高|医生: the word, not a person
        words = [(t, p == start) for p, t in tokens.items() if start <= p and p + len(t) <= title_start]
        if len(candidate) == 3 and _word_then_name_char(text, start, words[0][0], 3):
            words = words[1:]
        if any(len(t) > 1 and t != candidate[:surname] and _dictionary_word(t) and (first or _word_tag(t) in WORD_TAGS)
               for t, first in words):
            continue  # 严格|按, 门诊|让: words, not a name (a given name jieba knows, 邱|玉兰, is still a name)
        given = candidate[surname:]
        if len(given) > 2 or any(c in AFTER_NAME for c in given):
            continue
        return start
    return -1


def names_before_titles(text: str) -> Iterator[Span]:
    for title in TITLE.finditer(text):
        start = name_before_title(text, title.start(), title.end())
        if start >= 0:
            yield Span(start, title.start(), "name")


def find_names(text: str) -> Iterator[Span]:
    if not CJK.search(text):
        return
    yield from names_after_cues(text)
    yield from names_before_titles(text)
