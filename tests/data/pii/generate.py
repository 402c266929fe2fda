"""A planted-PII corpus of Chinese clinical records, with gold spans, written by us for the scrub tests.

`generate(records, seed)` builds admission notes, outpatient records, consultation dialogues and consultation
(会诊) notes. Each record is a list of text fields (one for a note, one per turn for a dialogue) and, per field,
the gold spans of every planted item: `(start, end, kind)`, kinds as in `medtune.data.pii.KINDS`. Look-alikes that
must stay (drug doses, lab values, ICD-10 codes, onset and visit dates, departments, herb and drug names that
look like names, drugs, herbs and findings right after 患者 that start with a surname character (患者华法林抗凝治疗中),
ages up to 89, 18-digit barcodes with a wrong ID check digit) are recorded too, as
`(start, end, "lookalike:<what>")`, so the test can count them; a finding that overlaps one is a false positive.

Deliberately independent of the detector: its own surname and given-name lists (a few rare surnames the
detector does not list), its own check-digit and Luhn code, and phrasings the detector has no cue for (由其外甥…陪同,
我是…的家属), so the measured recall is not a closed loop. Some phone and card numbers are typed in full-width digits. The
clinical content is medically consistent per disease (onset, age and sex ranges per disease).
Deterministic for a given seed.
"""

from __future__ import annotations

import datetime
import random
from dataclasses import dataclass, field

# --- people --------------------------------------------------------------------------------------------------
SURNAMES = list("王李张刘陈杨赵黄周吴徐孙胡朱高林何郭马罗梁宋郑谢韩唐冯于董萧程曹袁邓许傅沈曾彭吕苏卢蒋蔡贾丁魏"
                "薛叶阎余潘杜戴夏钟汪田任姜范方石姚谭廖邹熊金陆郝孔白崔康毛邱秦江史顾侯邵孟龙万段章钱汤尹黎易常武"
                "乔贺赖龚文")
COMPOUND = ["欧阳", "司马", "上官", "诸葛", "慕容", "皇甫"]
RARE = ["禚", "笪", "眭", "亓官"]  # real but rare surnames: the detector's list does not have them
GIVEN_CHARS = list("伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉萍红娥玲兰凤梅琳素云莲真环雪荣爱妹香月莺媛瑞凡"
                   "佳嘉琼勤珍贞莉桂娣叶璧璐娅琦晶妍茜秋珊莎锦黛青倩婷姣婉娴瑾颖露瑶怡婵雁蓓纨仪荷丹蓉眉君琴蕊薇菁梦"
                   "岚苑婕馨瑗琰韵融园艺咏卿聪澜纯毓悦昭冰爽琬茗羽希宁欣飘育滢馥筠柔竹霭凝晓欢霄枫芸菲寒伊亚宜可姬舒"
                   "影荔枝思丽浩宇轩博文子涵睿泽辰皓俊豪鹏飞峰斌彬振宏志建国庆春福德胜海波")
GIVEN_PAIRS = ["建国", "秀英", "桂兰", "志强", "丽娟", "浩然", "子涵", "欣怡", "一诺", "淑珍", "玉兰", "德胜", "国华",
               "红梅", "晓东", "海燕", "春生", "文博", "雨桐", "思远", "俊杰", "佳怡", "明轩", "秀兰", "凤英", "永红"]

# --- numbers, independent of the detector's code ---------------------------------------------------------------
REGIONS = ["110105", "110108", "120101", "130102", "140105", "210202", "220102", "310104", "310115", "320102",
           "320506", "330106", "340104", "350203", "360102", "370102", "410105", "420106", "430104", "440106",
           "440305", "450103", "500103", "510107", "520102", "530102", "610113", "620102", "650102", "460106"]
FULL_WIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
ID_WEIGHTS = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]


def id_check_digit(first17: str) -> str:
    return "10X98765432"[sum(int(d) * w for d, w in zip(first17, ID_WEIGHTS)) % 11]


def luhn_digit(body: str) -> str:
    total = 0
    for i, d in enumerate(reversed(body)):
        n = int(d) * (2 if i % 2 == 0 else 1)
        total += n - 9 if n > 9 else n
    return str((10 - total % 10) % 10)


@dataclass
class Field:
    parts: list[str] = field(default_factory=list)
    spans: list[tuple[int, int, str]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return sum(map(len, self.parts))

    def add(self, *texts: str) -> None:
        self.parts += texts

    def item(self, kind: str, value: str) -> None:
        start = self.length
        self.parts.append(value)
        self.spans.append((start, start + len(value), kind))

    @property
    def text(self) -> str:
        return "".join(self.parts)


class Planter:
    """Random clinical facts and PII values, all from one seeded generator."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def choice(self, items):
        return self.rng.choice(items)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def surname(self) -> str:
        roll = self.rng.random()
        if roll < 0.015:
            return self.choice(RARE)
        if roll < 0.06:
            return self.choice(COMPOUND)
        return self.choice(SURNAMES)

    def given(self) -> str:
        roll = self.rng.random()
        if roll < 0.35:
            return self.choice(GIVEN_PAIRS)
        if roll < 0.6:
            return self.choice(GIVEN_CHARS)
        return self.choice(GIVEN_CHARS) + self.choice(GIVEN_CHARS)

    def name(self) -> str:
        return self.surname() + self.given()

    def birth(self, age: int, visit: datetime.date) -> datetime.date:
        return visit - datetime.timedelta(days=age * 365 + self.rng.randrange(1, 360))

    def id_number(self, born: datetime.date, old: bool = False) -> str:
        region, serial = self.choice(REGIONS), f"{self.rng.randrange(1000):03d}"
        if old:
            return region + born.strftime("%y%m%d") + serial
        body = region + born.strftime("%Y%m%d") + serial
        return body + id_check_digit(body)

    def bad_id_number(self) -> str:
        """18 digits shaped like an ID (region, birth date) whose check digit is wrong."""
        born = datetime.date(1940, 1, 1) + datetime.timedelta(days=self.rng.randrange(25000))
        body = self.choice(REGIONS) + born.strftime("%Y%m%d") + f"{self.rng.randrange(1000):03d}"
        good = id_check_digit(body)
        return body + self.choice([c for c in "0123456789X" if c != good])

    def full_width(self, number: str) -> str:
        """Now and then typed with a Chinese input method: full-width digits (１３８…)."""
        return number.translate(FULL_WIDTH) if self.chance(0.08) else number

    def mobile(self) -> str:
        digits = self.choice(["13", "15", "18", "17", "19", "14"]) + "".join(str(self.rng.randrange(10)) for _ in range(9))
        style = self.rng.randrange(5)
        if style == 1:
            return f"{digits[:3]}-{digits[3:7]}-{digits[7:]}"
        if style == 2:
            return f"{digits[:3]} {digits[3:7]} {digits[7:]}"
        if style == 3:
            return "+86 " + digits
        return self.full_width(digits)

    def landline(self) -> str:
        area, length = self.choice([("010", 8), ("021", 8), ("020", 8), ("0571", 8), ("0755", 8), ("028", 8),
                                    ("0731", 8), ("0351", 7), ("0871", 8), ("0991", 7)])
        number = str(self.rng.randrange(2, 10)) + "".join(str(self.rng.randrange(10)) for _ in range(length - 1))
        style = self.rng.randrange(4)
        text = f"({area}){number}" if style == 0 else f"（{area}）{number}" if style == 1 else f"{area}-{number}"
        if self.chance(0.15):
            text += f"转{self.rng.randrange(100, 9999)}"
        return text

    def phone(self) -> str:
        return self.mobile() if self.chance(0.7) else self.landline()

    def record_number(self) -> str:
        style = self.rng.randrange(5)
        digits = lambda n: "".join(str(self.rng.randrange(10)) for _ in range(n))  # noqa: E731
        return [digits(self.rng.randrange(6, 11)), "ZY" + digits(8), f"MZ{self.rng.randrange(2015, 2025)}-{digits(6)}",
                "00" + digits(8), f"H{digits(7)}"][style]

    def email(self, name_hint: str = "") -> str:
        user = self.choice(["zhang", "li.ming", "wangfang", "liu_yang", "chen88", "yang.jing", "zhaolei", "huang.w",
                            "zhou_min", "wuqiang", "xu.lin", "sunli", "doctor.ma", "hu2020", "gao.feng"])
        if self.chance(0.6):
            user += str(self.rng.randrange(1, 9999))
        return user + "@" + self.choice(["qq.com", "163.com", "126.com", "sina.com", "gmail.com", "hospital.org.cn",
                                         "foxmail.com", "sohu.com", "outlook.com"])

    def bank_card(self) -> str:
        prefix = self.choice(["622202", "621700", "622848", "621661", "622588", "625965", "436742", "622609"])
        length = self.choice([16, 19, 19, 16, 18])
        body = prefix + "".join(str(self.rng.randrange(10)) for _ in range(length - len(prefix) - 1))
        number = body + luhn_digit(body)
        if self.chance(0.3):
            return " ".join(number[i:i + 4] for i in range(0, len(number), 4))
        return self.full_width(number)

    def address(self, street_required: bool = False) -> str:
        city, districts = self.choice([
            ("北京市", ["海淀区", "朝阳区", "西城区", "丰台区"]), ("上海市", ["浦东新区", "徐汇区", "静安区", "闵行区"]),
            ("广东省广州市", ["天河区", "越秀区", "海珠区"]), ("浙江省杭州市", ["西湖区", "拱墅区", "滨江区"]),
            ("四川省成都市", ["武侯区", "锦江区", "青羊区"]), ("湖南省长沙市", ["岳麓区", "芙蓉区", "开福区"]),
            ("江苏省南京市", ["鼓楼区", "玄武区", "秦淮区"]), ("湖北省武汉市", ["武昌区", "江汉区", "洪山区"]),
        ])
        district = self.choice(districts)
        road = self.choice(["中山路", "解放路", "人民大道", "建设路", "文化街", "学院路", "长江路", "复兴路", "幸福街",
                            "和平路", "青年路", "新华路", "光明巷", "朝阳街"])
        if not street_required and self.chance(0.15):
            town = self.choice(["城关镇", "新店镇", "白沙乡", "石桥镇"])
            village = self.choice(["红星村", "前进村", "李家村", "东湖村"])
            return f"{city[:3] if len(city) > 3 else city}{self.choice(['望城县', '双流县', '长兴县'])}{town}{village}{self.rng.randrange(1, 12)}组"
        text = f"{road}{self.rng.randrange(1, 999)}号"
        if self.chance(0.6):
            text += f"{self.rng.randrange(1, 30)}栋{self.rng.randrange(1, 6)}单元{self.rng.randrange(1, 33)}0{self.rng.randrange(1, 5)}室"
        prefix = self.rng.randrange(3)
        return (city + district if prefix == 0 else district if prefix == 1 else city) + text if self.chance(0.9) \
            else text

    def date(self, day: datetime.date) -> str:
        style = self.rng.randrange(4)
        if style == 0:
            return f"{day.year}年{day.month}月{day.day}日"
        if style == 1:
            return day.strftime("%Y-%m-%d")
        if style == 2:
            return f"{day.year}/{day.month}/{day.day}"
        return day.strftime("%Y.%m.%d")


# --- clinical content ----------------------------------------------------------------------------------------
# Each disease: `onset` = the range of {n} in its complaint, in `unit`s (consistent with the plan: alteplase only
# within 4.5 h of a stroke, PCI within 12 h of a STEMI, appendicitis pain that moved after 6 h), and `after_patient`
# = what clinical text writes right after 患者 that starts with a surname character (drugs, herbs, findings):
# look-alikes that must stay, the second part continues the sentence.
DISEASES = [
    dict(diagnosis="急性前壁ST段抬高型心肌梗死", onset=(1, 11), unit="小时", after_patient=[("阿司匹林", "300mg嚼服后胸痛无明显缓解"), ("舒张压", "60 mmHg，收缩压95 mmHg"), ("白细胞", "计数轻度升高")], icd="I21.0", dept="心内科", complaint="持续性胸骨后压榨样疼痛{n}小时",
         history="疼痛向左肩放射，伴大汗、恶心，含服硝酸甘油不缓解",
         exam="心电图示V1-V4导联ST段抬高0.3-0.5mV，高敏肌钙蛋白T {v:0.8-3.5} ng/ml",
         plan="阿司匹林300mg、替格瑞洛180mg嚼服负荷，急诊行冠状动脉造影及PCI"),
    dict(diagnosis="社区获得性肺炎", onset=(2, 7), unit="天", after_patient=[("莫西沙星", "0.4g qd静滴3天后体温下降"), ("罗红霉素", "口服3天无效后入院"), ("白细胞", "计数升高，以中性粒细胞为主")], icd="J18.9", dept="呼吸与危重症医学科", complaint="发热、咳嗽、咳黄痰{n}天",
         history="最高体温39.2℃，伴寒战及右侧胸痛", exam="WBC {v:12-18}×10^9/L，中性粒细胞85%，CRP 96 mg/L，胸部CT示右下肺实变",
         plan="头孢曲松2.0g ivgtt qd联合阿奇霉素0.5g ivgtt qd抗感染"),
    dict(diagnosis="2型糖尿病", onset=(2, 11), unit="个月", after_patient=[("甘油三酯", "2.8 mmol/L"), ("阿卡波糖", "50mg tid与第一口饭同时嚼服"), ("单侧", "足背动脉搏动减弱"), ("戴眼镜", "仍视物模糊，眼底检查示非增殖期糖尿病视网膜病变")], icd="E11.9", dept="内分泌科", complaint="多饮、多尿、体重下降{n}个月",
         history="病程中体重下降约5kg", exam="空腹血糖 {v:9-15} mmol/L，糖化血红蛋白 8.9%，尿酮体阴性",
         plan="二甲双胍0.5g tid餐中服，糖尿病饮食及运动指导"),
    dict(diagnosis="原发性高血压3级（很高危）", onset=(2, 11), unit="年", after_patient=[("华法林", "抗凝治疗中（心房颤动），INR 2.3，嘱华法林与阿司匹林避免合用"), ("舒张压", "持续高于100 mmHg"), ("房颤", "病史5年，长期华法林抗凝")], icd="I10", dept="心内科", complaint="反复头晕{n}年，加重3天",
         history="血压最高190/110mmHg，未规律服药", exam="血压 172/98 mmHg，心率 {v:72-96} 次/分，血钾 3.9 mmol/L",
         plan="氨氯地平5mg qd联合缬沙坦80mg qd，低盐饮食"),
    dict(diagnosis="慢性阻塞性肺疾病急性加重", onset=(2, 7), unit="天", after_patient=[("莫西沙星", "0.4g qd静滴抗感染"), ("白细胞", "计数正常，痰培养待回报"), ("桶状胸", "，叩诊呈过清音")], icd="J44.1", dept="呼吸与危重症医学科", complaint="反复咳嗽咳痰20年，气促加重{n}天",
         history="冬春季节易发作，吸烟40包年", exam="SpO2 {v:86-92}%，动脉血气PaCO2 52mmHg，双肺可闻及哮鸣音",
         plan="低流量吸氧，布地奈德混悬液雾化，甲泼尼龙40mg qd静滴5天"),
    dict(diagnosis="急性阑尾炎", onset=(8, 24), unit="小时", after_patient=[("麦氏点", "压痛、反跳痛明显"), ("包块", "未触及，结肠充气试验阳性"), ("白细胞", "及中性粒细胞比例升高")], icd="K35.8", dept="普通外科", complaint="转移性右下腹痛{n}小时",
         history="疼痛始于脐周，6小时后转移至右下腹", exam="麦氏点压痛、反跳痛，WBC {v:11-16}×10^9/L",
         plan="急诊行腹腔镜阑尾切除术，术前头孢呋辛1.5g静滴"),
    dict(diagnosis="急性缺血性脑卒中", onset=(1, 4), unit="小时", after_patient=[("房颤", "病史3年，未规律抗凝"), ("阿替普酶", "溶栓后24小时复查头颅CT未见出血"), ("舒张压", "105 mmHg，溶栓前血压控制在185/110 mmHg以下")], icd="I63.9", dept="神经内科", complaint="突发左侧肢体无力{n}小时",
         history="伴言语含糊，无头痛呕吐", exam="NIHSS评分 {v:4-12} 分，头颅CT未见出血",
         plan="发病4.5小时内予阿替普酶0.9mg/kg静脉溶栓"),
    dict(diagnosis="缺铁性贫血", onset=(2, 11), unit="个月", after_patient=[("叶酸", "及维生素B12水平正常"), ("白细胞", "及血小板计数正常"), ("宫颈", "筛查未见异常，妇科超声示子宫肌瘤"), ("米非司酮", "10mg qd口服治疗子宫肌瘤，月经量较前减少")], icd="D50.9", dept="血液科", complaint="乏力、活动后心悸{n}个月",
         history="月经量多2年", sex="女", ages=(20, 50), exam="血红蛋白 {v:68-95} g/L，MCV 72 fl，血清铁蛋白 6 μg/L",
         plan="琥珀酸亚铁0.1g tid口服，维生素C同服"),
    dict(diagnosis="痛风性关节炎急性发作", onset=(1, 5), unit="天", after_patient=[("秋水仙碱", "0.5mg bid后关节疼痛缓解"), ("白细胞", "轻度升高，血沉增快"), ("单侧", "第一跖趾关节受累")], icd="M10.9", dept="风湿免疫科", complaint="右足第一跖趾关节红肿热痛{n}天",
         history="发作前饮酒及进食海鲜", exam="血尿酸 {v:520-680} μmol/L，关节局部皮温升高",
         plan="秋水仙碱0.5mg bid，急性期后启动降尿酸治疗"),
    dict(diagnosis="幽门螺杆菌相关慢性胃炎", onset=(2, 11), unit="个月", after_patient=[("阿莫西林", "皮试阴性，无青霉素过敏史"), ("雷贝拉唑", "10mg bid可替代奥美拉唑"), ("柴胡", "疏肝散加减（中医辨证肝胃不和）")], icd="K29.5", dept="消化内科", complaint="上腹部隐痛伴反酸{n}个月",
         history="进食后加重", exam="13C尿素呼气试验阳性，胃镜示胃窦黏膜充血水肿",
         plan="四联疗法14天：阿莫西林1.0g bid、克拉霉素0.5g bid、奥美拉唑20mg bid、枸橼酸铋钾220mg bid"),
    dict(diagnosis="急性感染性腹泻", onset=(1, 5), unit="天", after_patient=[("蒙脱石散", "3g tid口服后大便次数减少"), ("诸症", "缓解，大便成形"), ("黄连素", "0.3g tid口服")], icd="A09.9", dept="消化内科", complaint="腹泻、稀水样便每日6-8次{n}天",
         history="病前有不洁饮食史", exam="大便常规白细胞 {v:5-15}/HP，血钾 3.3 mmol/L",
         plan="口服补液盐，黄连素（小檗碱）0.3g tid，蒙脱石散3g tid"),
    dict(diagnosis="药物性肝损伤", onset=(1, 4), unit="周", after_patient=[("何首乌", "制剂已停用"), ("谷丙转氨酶", "较前下降"), ("甘草酸", "二铵150mg tid口服保肝"), ("黄疸", "逐渐消退")], icd="K71.9", dept="消化内科", complaint="乏力、纳差、尿黄{n}周",
         history="发病前自行服用何首乌制剂2个月", exam="ALT {v:380-900} U/L，总胆红素 68 μmol/L",
         plan="立即停用何首乌，予多烯磷脂酰胆碱456mg tid口服，监测肝功能"),
    dict(diagnosis="继发性肺结核", onset=(3, 11), unit="周", icd="A15.0", dept="感染科",
         after_patient=[("利福平", "服药后尿液呈橘红色，属正常现象"),
                        ("利福平", "、异烟肼、吡嗪酰胺、乙胺丁醇四联抗结核治疗中"), ("戴口罩", "，减少飞沫传播")],
         complaint="咳嗽、午后低热、盗汗{n}周", history="伴乏力、体重下降", exam="痰抗酸染色阳性，红细胞沉降率 {v:40-80} "
         "mm/h，胸部CT示右上肺斑片影伴空洞", plan="2HRZE/4HR方案：异烟肼0.3g qd、利福平0.45g qd、吡嗪酰胺1.5g qd、"
         "乙胺丁醇0.75g qd"),
]
UNIT_DAYS = {"小时": 0, "天": 1, "周": 7, "个月": 30, "年": 365}
HERBS = ["黄连素", "白芍", "何首乌", "马来酸氯苯那敏", "田七", "金银花", "徐长卿", "刘寄奴", "王不留行", "杜仲", "高良姜",
         "石斛", "陈皮", "柴胡", "马齿苋", "白头翁", "连翘", "苏合香丸", "常山", "防风", "牛黄解毒片", "甘草", "马来酸依那普利"]
DEPARTMENTS = ["心内科", "呼吸与危重症医学科", "消化内科", "内分泌科", "神经外科", "急诊科", "重症医学科", "肾内科",
               "老年医学科", "康复医学科"]
RELATIONS = ["其子", "其女", "其妻", "其夫", "家属", "联系人：", "监护人", "其女儿", "配偶"]
UNCUED_RELATIONS = ["由其外甥", "由其侄子", "由邻居"]  # no detector cue: an honest miss unless named elsewhere
DOCTOR_BEFORE = ["主治医师：", "经治医师：", "住院医师", "上级医师", "医师签名：", "记录者：", "接诊医生：", "会诊医师："]
DOCTOR_TITLES = ["主任", "医生", "主任医师", "副主任医师", "护士长", "教授"]


class RecordWriter:
    """Builds one record field by field, planting PII and look-alikes."""

    def __init__(self, planter: Planter):
        self.p = planter
        self.fields: list[Field] = []
        self.visit = datetime.date(2023, 1, 1) + datetime.timedelta(days=planter.rng.randrange(700))
        self.onsets: dict[str, int] = {}

    def onset(self, disease: dict) -> int:
        """How many `unit`s ago the disease began: one number per record, in the disease's own range."""
        low, high = disease["onset"]
        return self.onsets.setdefault(disease["diagnosis"], self.p.rng.randrange(low, high + 1))

    def age(self, disease: dict, *ranges: tuple[int, int]) -> int:
        """An age from one of `ranges`, within the disease's own age range when it has one (menorrhagia)."""
        if "ages" in disease:
            return self.p.rng.randrange(disease["ages"][0], disease["ages"][1] + 1)
        return self.p.rng.randrange(*self.p.choice(ranges))

    def after_patient(self, f: Field, disease: dict) -> None:
        """患者 + a drug, herb or finding that starts with a surname character: a look-alike of a name."""
        word, rest = self.p.choice(disease["after_patient"])
        f.add("患者")
        self.lookalike(f, "after 患者", word)
        f.add(rest, "。")

    def field(self) -> Field:
        self.fields.append(Field())
        return self.fields[-1]

    def lookalike(self, f: Field, what: str, text: str) -> None:
        f.item(f"lookalike:{what}", text)

    def age_text(self, f: Field, age: int, unit: str = "岁") -> None:
        value = f"{age}{unit}" if age <= 89 or not self.p.chance(0.1) else \
            {90: "九十岁", 92: "九十二岁", 95: "九十五岁", 98: "九十八岁"}.get(age, f"{age}{unit}")
        if age > 89:
            f.item("age", value)
        else:
            self.lookalike(f, "age<=89", value)

    def disease_text(self, f: Field, disease: dict, template: str) -> None:
        """Clinical text whose numbers are look-alikes (lab values, doses)."""
        text = template.replace("{n}", str(self.onset(disease)))
        while "{v:" in text:
            head, rest = text.split("{v:", 1)
            spec, tail = rest.split("}", 1)
            low, high = spec.split("-")
            if "." in low:
                value = f"{self.p.rng.uniform(float(low), float(high)):.1f}"
            else:
                value = str(self.p.rng.randrange(int(low), int(high) + 1))
            f.add(head)
            self.lookalike(f, "lab value", value)
            text = tail
        f.add(text)


def admission_note(w: RecordWriter) -> None:
    p, f = w.p, w.field()
    disease = p.choice(DISEASES)
    patient = p.name()
    age = w.age(disease, (18, 90), (90, 104), (45, 90))
    born = p.birth(age, w.visit)
    sex = disease.get("sex") or p.choice(["男", "女"])
    f.add("入院记录\n", p.choice(["姓名：", "患者姓名："]))
    f.item("name", patient)
    f.add(f"  性别：{sex}  年龄：")
    w.age_text(f, age)
    f.add(p.choice(["  出生日期：", "  出生年月：", "  生日："]))
    f.item("birth_date", p.date(born))
    f.add(p.choice(["\n身份证号：", "\n身份证号码：", "\n公民身份号码：", "\n证件号："]))
    f.item("id_card", p.id_number(born, old=age > 60 and p.chance(0.25)))
    f.add(p.choice(["  住院号：", "  病案号：", "  住院号码 ", "  病历号为"]))
    f.item("record_no", p.record_number())
    f.add(p.choice(["\n联系电话：", "\n手机：", "\n电话 ", "\n联系方式："]))
    f.item("phone", p.phone())
    f.add(p.choice(["\n现住址：", "\n住址：", "\n家庭住址：", "\n户籍地址："]))
    f.item("address", p.address())
    relative = p.name()
    f.add(f"\n{p.choice(RELATIONS)}")
    f.item("name", relative)
    f.add(p.choice(["，电话", "，联系电话：", "（手机）"]))
    f.item("phone", p.phone())
    f.add(f"\n入院日期：{p.date(w.visit)}  科室：")
    w.lookalike(f, "department", disease["dept"])
    f.add("\n主诉：")
    w.disease_text(f, disease, disease["complaint"])
    f.add("。\n现病史：患者")
    f.item("name", patient)
    f.add(p.choice(["于", "自"]))
    n, unit = w.onset(disease), disease["unit"]
    onset = w.visit - datetime.timedelta(days=n * UNIT_DAYS[unit])
    w.lookalike(f, "onset date", f"{onset.year}年" if unit == "年" else f"{onset.year}年{onset.month}月"
                if unit == "个月" else f"{onset.year}年{onset.month}月{onset.day}日")
    f.add(f"起病，{disease['history']}。病程")
    w.lookalike(f, "onset date", f"{n}{unit}")
    f.add("。")
    w.after_patient(f, disease)
    f.add("既往史：")
    if p.chance(0.5):
        f.add("曾自行服用")
        w.lookalike(f, "herb", p.choice(HERBS))
        f.add("等中药，")
    f.add("否认药物过敏史。\n辅助检查：")
    w.disease_text(f, disease, disease["exam"])
    f.add("。\n初步诊断：", disease["diagnosis"], "（ICD-10 ")
    w.lookalike(f, "ICD-10", disease["icd"])
    f.add("）\n诊疗计划：")
    w.disease_text(f, disease, disease["plan"])
    f.add("。\n")
    if p.chance(0.6):
        f.add("患者医保关联银行卡号：" if p.chance(0.5) else "退费账户：")
        f.item("bank_card", p.bank_card())
        f.add("，")
    if p.chance(0.5):
        f.add("电子邮箱：" if p.chance(0.5) else "E-mail: ")
        f.item("email", p.email())
        f.add("。")
    f.add(p.choice(DOCTOR_BEFORE))
    f.item("name", p.name())
    f.add("\n标本条码：")
    w.lookalike(f, "bad-checksum ID", p.bad_id_number())
    f.add("\n")


def outpatient_record(w: RecordWriter) -> None:
    p, f = w.p, w.field()
    disease = p.choice(DISEASES)
    patient, age = p.name(), w.age(disease, (18, 90), (90, 101))
    f.add(f"{disease['dept']}门诊病历  门诊号：")
    f.item("record_no", p.record_number())
    f.add("\n患者")
    f.item("name", patient)
    f.add(f"，{disease.get('sex') or p.choice(['男', '女'])}，")
    w.age_text(f, age)
    if p.chance(0.3):  # a valid ID with no cue word: found by its check digit alone
        f.add("（")
        f.item("id_card", p.id_number(p.birth(age, w.visit)))
        f.add("）")
    f.add("，因“")
    w.disease_text(f, disease, disease["complaint"])
    f.add("”就诊。患者")
    f.item("name", patient)
    f.add(p.choice(["诉", "自述"]), disease["history"], "。")
    if p.chance(0.7):
        w.after_patient(f, disease)
    f.add("查体及检查：")
    w.disease_text(f, disease, disease["exam"])
    f.add("。诊断：", disease["diagnosis"], "（")
    w.lookalike(f, "ICD-10", disease["icd"])
    f.add("）。处理：")
    w.disease_text(f, disease, disease["plan"])
    weeks = p.rng.randrange(1, 4)
    f.add(f"。{weeks}周后复诊，复诊时间：")
    w.lookalike(f, "visit date", p.date(w.visit + datetime.timedelta(weeks=weeks)))
    f.add("。患者联系电话")
    f.item("phone", p.phone())
    if p.chance(0.6):
        f.add("，身份证号")
        born = p.birth(age, w.visit)
        f.item("id_card", p.id_number(born))
        f.add("，")
        f.item("birth_date", p.date(born))
        f.add(p.choice(["出生", "生"]))
    if p.chance(0.4):
        f.add("。患者现居住于")
        f.item("address", p.address())
    if p.chance(0.3):
        f.add("。")
        f.add(p.choice(UNCUED_RELATIONS))
        f.item("name", p.name())
        f.add("陪同就诊")
    f.add("。\n")
    doctor = p.name()
    if p.chance(0.5):
        f.item("name", doctor)
        f.add(p.choice(DOCTOR_TITLES))
    else:
        f.add("接诊医师：")
        f.item("name", doctor)
    f.add("\n")


def consultation_dialogue(w: RecordWriter) -> None:
    p = w.p
    disease = p.choice(DISEASES)
    patient, age = p.name(), w.age(disease, (20, 90), (90, 100))
    honorific = "女士" if disease.get("sex") == "女" else p.choice(["先生", "女士"])
    doctor_surname = p.choice(SURNAMES)
    f = w.field()
    f.add(p.choice(["医生您好，", "大夫好，", "您好，"]), p.choice(["我叫", "本人", "患者姓名："]))
    f.item("name", patient)
    f.add("，今年")
    w.age_text(f, age)
    f.add("，最近")
    w.disease_text(f, disease, disease["complaint"])
    f.add("，想咨询一下。")
    f = w.field()
    f.add(f"您好，我是{disease['dept']}的")
    f.item("name", doctor_surname)
    f.add(p.choice(["医生", "大夫"]), "。请问", disease["history"].split("，")[0], "吗？有没有在吃什么药？")
    f = w.field()
    f.add("是的。之前吃过")
    w.lookalike(f, "herb", p.choice(HERBS))
    f.add("。我的手机是")
    f.item("phone", p.mobile())
    f.add(p.choice(["，门诊号", "，就诊卡号", "，ID号："]))
    f.item("record_no", p.record_number())
    if p.chance(0.5):
        f.add("，邮箱")
        f.item("email", p.email())
    if p.chance(0.4):
        f.add("，我的出生日期是")
        f.item("birth_date", p.date(p.birth(age, w.visit)))
    if p.chance(0.4):
        f.add("。我住在")
        f.item("address", p.address())
    if p.chance(0.3):
        f.add("，挂号费退到银行卡")
        f.item("bank_card", p.bank_card())
    f.add("。")
    f = w.field()
    f.add("根据描述考虑", disease["diagnosis"], "可能，建议到", disease["dept"], "门诊就诊，完善检查：")
    w.disease_text(f, disease, disease["exam"])
    f.add("。")
    f.item("name", patient)
    f.add(honorific, "，治疗上一般为：")
    w.disease_text(f, disease, disease["plan"])
    f.add("，具体请遵医嘱。")


def consultation_note(w: RecordWriter) -> None:
    p, f = w.p, w.field()
    disease = p.choice(DISEASES)
    patient, senior = p.name(), p.name()
    f.add("会诊记录\n病人")
    f.item("name", patient)
    f.add("，住院号")
    f.item("record_no", p.record_number())
    f.add(f"，因{disease['diagnosis']}请")
    w.lookalike(f, "department", p.choice(DEPARTMENTS))
    f.add("会诊。请")
    f.item("name", senior)
    f.add(p.choice(["主任", "教授", "副主任医师"]), "会诊后意见：", disease["history"], "；")
    w.disease_text(f, disease, disease["plan"])
    f.add("。既往服用")
    w.lookalike(f, "herb", p.choice(HERBS))
    f.add("需停用。")
    if p.chance(0.5):
        w.after_patient(f, disease)
    if p.chance(0.6):
        f.add("患者在")
        f.item("address", p.address(street_required=True))
        f.add("家中发病，")
    f.add("家属")
    f.item("name", p.name())
    f.add("已知情同意并签字，联系电话")
    f.item("phone", p.phone())
    f.add("，证件号码：")
    age = w.age(disease, (30, 100))
    born = p.birth(age, w.visit)
    f.item("id_card", p.id_number(born, old=p.chance(0.3)))
    f.add("。患者年龄：")
    if age > 89:
        f.item("age", str(age))
    else:
        w.lookalike(f, "age<=89", str(age))
    f.add("，发票号", str(p.rng.randrange(10 ** 11, 10 ** 12)), "，出生于")
    f.item("birth_date", p.date(born))
    if p.chance(0.5):
        f.add("。邮寄报告至")
        f.item("email", p.email())
    if p.chance(0.5):
        f.add("。费用已从卡号")
        f.item("bank_card", p.bank_card())
        f.add("扣除")
    f.add("。")
    f.item("name", senior)
    f.add(p.choice(DOCTOR_TITLES), "\n")


WRITERS = (admission_note, outpatient_record, consultation_dialogue, consultation_note)


def generate(records: int = 1000, seed: int = 0) -> list[list[tuple[str, list[tuple[int, int, str]]]]]:
    """`records` records, each a list of (text, gold spans) fields."""
    planter = Planter(seed)
    corpus = []
    for index in range(records):
        writer = RecordWriter(planter)
        WRITERS[index % len(WRITERS)](writer)
        corpus.append([(f.text, f.spans) for f in writer.fields])
    return corpus
