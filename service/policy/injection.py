"""Prompt-injection detection: does a question try to override the assistant's instructions?

Patterns run over a folded "detection view" of the text (NFKC, combining marks, small capitals,
case, look-alike letters, leetspeak, spelled-out letters, spaces), so simple obfuscation does not
dodge them; base64-encoded instructions are decoded once and checked too. English patterns cover
overriding, role-play without restrictions, prompt leaks and fake chat markup; the commonest
attacks are also matched in other languages. Pure and deterministic.
"""

from __future__ import annotations

import base64
import re
import unicodedata
from typing import Final

__all__ = ["looks_like_injection"]


# Letters spelled out with single separators ("i g n o r e") are joined in the
# detection view; a double space still separates words.
_SPACED_LETTERS: Final = re.compile(r"(?<!\w)(?:\w[ ._*\-]){2,}\w(?!\w)")
_SPACER: Final = re.compile(r"[ ._*\-]")
_HSPACE: Final = re.compile(r"[^\S\n]+")
_QUOTES: Final = re.compile("[\u2018\u2019\u201b\u2032`]")

# Start of an imperative: text/sentence start, punctuation, or a politeness
# word. Used where the phrase alone is also a normal question ("how do I print
# the system prompt in LangChain?").
_IMP: Final = r"(?:^|[.!?;:,>\"'(\[\n]\s*|\b(?:please|now|just|first|kindly|ok|okay)\s*,?\s+)"
_LEAK_VERB: Final = (
    r"(?:reveal|print|show|display|output|repeat|leak|dump|expose|disclose|"
    r"recite|echo|paste|share|tell|give|list|write\s+out|spell\s+out)"
)
_PROMPT_TARGET: Final = (
    r"(?:(?:full|exact|complete|entire|whole|actual|real)\s+)?"
    r"(?:system[\s\-]*prompt|pre-?prompt|"
    r"(?:system|initial|original|hidden|secret|internal|confidential|developer)"
    r"[\s\-]+(?:prompts?|instructions|messages?|rules|directives))"
)
_UNRESTRICTED_WORDS: Final = (
    r"restrictions|limitations|filters?|filtering|censorship|guardrails|"
    r"guidelines|ethics|morals|morality|safeguards|content\s+polic(?:y|ies)"
)
_UNRESTRICTED: Final = r"(?:" + _UNRESTRICTED_WORDS + r")"


def _ignore_previous(verbs: str, qualifiers: str, nouns: str) -> str:
    """The verb, then previous/all/your and the instructions (either order), in one sentence."""
    near = r"[^.!?\n]{0,30}?"
    return (
        rf"\b(?:{verbs})\b[^.!?\n]{{0,40}}?"
        rf"(?:\b(?:{qualifiers})\b{near}\b(?:{nouns})\b|\b(?:{nouns})\b{near}\b(?:{qualifiers})\b)"
    )


# The two commonest attacks in other languages: "ignore the previous instructions" and
# "show me your system prompt". As in English, "instructions" alone is not enough: they must
# be the previous / all / your ones, and the prompt must be the assistant's ("your").
_OTHER_LANGUAGES: Final = (
    _ignore_previous(  # es
        "ignora|ignore|ignoren|ignorar|olvida|olvide|olviden|olvidar|omite|omita|descarta|descarte",
        "anteriores|previas|precedentes|todas|tus|sus",
        "instrucciones|indicaciones|directrices",
    ),
    _ignore_previous(  # pt
        "ignore|ignora|ignorem|ignorar|esqueça|esqueca|esquece|esqueçam|desconsidere|desconsidera",
        "anteriores|prévias|previas|todas|suas|tuas",
        "instruções|instrucoes|orientações|orientacoes|diretrizes",
    ),
    _ignore_previous(  # fr
        "ignore|ignorez|ignorer|oublie|oubliez|oublier",
        "précédentes|precedentes|antérieures|anterieures|toutes|tes|vos",
        "instructions|consignes|directives",
    ),
    _ignore_previous(  # de (casefolded: ß is ss)
        "ignoriere|ignorier|ignoriert|ignorieren|vergiss|vergesst|vergessen|missachte|missachtet|missachten",
        "vorherigen|vorigen|bisherigen|obigen|früheren|fruheren|alle|allen|deine|ihre|eure",
        "anweisungen|anweisung|instruktionen|vorgaben|befehle",
    ),
    _ignore_previous(  # it
        "ignora|ignori|ignorate|ignorare|dimentica|dimentichi|dimenticate|dimenticare",
        "precedenti|tutte|tue|sue|vostre",
        "istruzioni|indicazioni|direttive",
    ),
    _ignore_previous(  # nl
        "negeer|negeert|negeren|vergeet|vergeten|verwaarloos|sla",
        "vorige|eerdere|voorgaande|bovenstaande|alle|je|jouw|uw",
        "instructies|instructie|aanwijzingen|opdrachten|richtlijnen|regels",
    ),
    _ignore_previous(  # pl (marks stripped: pomiń is pomin)
        r"zignoruj\w*|ignoruj\w*|zapomnij\w*|pomin\w*|odrzuc\w*",
        r"poprzedni\w*|wczesniejsz\w*|wszystki\w*|swoje|twoje|powyzsz\w*|dotychczasow\w*",
        r"instrukcj\w*|polece\w*|wskazowk\w*|zasad\w*|regul\w*",
    ),
    _ignore_previous(  # ru
        r"игнорир\w*|проигнорир\w*|забудь\w*|забыть|забудьте",
        r"предыдущ\w*|прежн\w*|вс[её]\w*|сво[иё]\w*|тво[иё]\w*|ваш\w*|выше",
        r"инструкци\w*|указани\w*|команд\w*",
    ),
    # zh: 忽略之前的所有指令 / 無視以上指示
    r"(?:忽略|忽视|忽視|无视|無視|忘记|忘記|不要理会|不要理會)[^。！？\n]{0,20}?"
    r"(?:之前|以前|先前|上面|上述|以上|前面|所有|全部|你的)[^。！？\n]{0,20}?(?:指令|指示|说明|說明|提示)",
    # ja: 以前の指示をすべて無視して
    r"(?:以前|前|上記|これまで|すべて|全て|あなた)の?[^。！？\n]{0,20}?(?:指示|命令|指令|プロンプト)"
    r"[^。！？\n]{0,20}?(?:無視|忘れ)",
    # ko: 이전의 모든 지시를 무시하세요
    r"(?:이전|앞의|위의|모든)[^.!?\n]{0,20}?(?:지시|지침|명령)[^.!?\n]{0,20}?(?:무시|잊어)",
    # show me your system prompt: es, pt, fr, de, it, ru, zh, ja
    r"\b(?:muestra|muéstrame|muestrame|revela|revélame|revelame|dime|imprime|repite|enséñame|ensename|"
    r"mostra|mostre|mostrar|revele|diga|mostrami|rivela|rivelami|dimmi|stampa|ripeti)\b[^.!?\n]{0,30}?"
    r"\b(?:tu|tus|teu|seu|tuo|tuoi|il\s+tuo)\s+(?:prompt|instrucciones|instruções|istruzioni)\s+"
    r"(?:del?\s+|do\s+|di\s+)?(?:sistema|system)\b",
    r"\b(?:montre|montrez|affiche|affichez|révèle|révélez|revele|donne|donnez|répète|répétez|repete)"
    r"(?:-moi)?\b[^.!?\n]{0,30}?\b(?:ton|votre|tes|vos)\s+(?:prompt|invite|instructions?|consignes)\s+"
    r"(?:système|systeme|cachées?|cachees?|initiales?)",
    r"\b(?:toon|laat|geef|herhaal|print|onthul)\b[^.!?\n]{0,30}?\b(?:je|jouw|uw)\s+"
    r"(?:systeemprompt|systeem-prompt|systeeminstructies|prompt|verborgen\s+instructies)\b",
    r"\b(?:pokaz|wyswietl|ujawnij|powtorz|podaj|wypisz|zdradz)\b[^.!?\n]{0,30}?\b(?:swoj|twoj|swoje|twoje|swoja|twoja)\s+"
    r"(?:prompt\s+systemowy|systemowy\s+prompt|instrukcje\s+systemowe|ukryte\s+instrukcje|prompt)\b",
    r"\b(?:zeig|zeige|zeigen|verrate|verraten|gib|nenne|nennen|wiederhole|wiederholen|drucke)\b[^.!?\n]{0,30}?"
    r"\b(?:dein|deinen|deine|ihren|ihre|ihr)\s+(?:system-?prompt|systemanweisungen|system-anweisungen|prompt)\b",
    r"\b(?:покажи|покажите|выведи|выведите|раскрой|раскройте|повтори|повторите|напечатай|скажи|назови)\b"
    r"[^.!?\n]{0,30}?(?:сво\w*\s+|тво\w*\s+|ваш\w*\s+)?системн\w*\s+(?:промпт|подсказк|инструкци|сообщени)\w*",
    r"(?:告诉|告訴|显示|顯示|输出|輸出|打印|泄露|洩露|透露|重复|重複|给我看|給我看)[^。！？\n]{0,10}?"
    r"你的(?:系统|系統)?(?:提示词|提示詞|提示|指令)",
    r"あなたの(?:システムプロンプト|システム指示|指示|プロンプト)[^。！？\n]{0,10}?(?:表示|教え|見せ|出力|開示)",
)

_INJECTION_PATTERNS: Final[tuple[re.Pattern[str], ...]] = tuple(
    re.compile(p)
    for p in (
        # ignore/disregard/forget (all) previous/prior/above ... instructions
        r"\b(?:ignore|disregard|forget)\s+(?:\w+\s+){0,3}?"
        r"(?:previous|prior|above|preceding|earlier|foregoing|former|original|"
        r"initial|all|any|every|your)\s+(?:\w+\s+){0,2}?"
        r"(?:instructions?|prompts?|directions|directives|programming)\b",
        # ... the system prompt / developer message
        r"\b(?:ignore|disregard|forget)\s+(?:\w+\s+){0,2}?"
        r"(?:system|developer|hidden|initial|original)\s*(?:prompt|message|instructions?)\b",
        _IMP + r"(?:override|bypass|overrule)\s+(?:\w+\s+){0,2}?"
        r"(?:system|developer|safety)\s*(?:prompt|message|instructions?|rules|guardrails)\b",
        # ... your rules / everything above / the above
        r"\b(?:ignore|disregard|forget)\s+(?:all\s+)?(?:of\s+)?your\s+(?:\w+\s+){0,2}?"
        r"(?:rules|guidelines|training|restrictions|guardrails|filters)\b",
        r"\b(?:ignore|disregard|forget)\s+(?:all|everything|anything)\s+"
        r"(?:(?:that\s+)?(?:was\s+|you\s+were\s+|i\s+)?(?:said|told|written|given|wrote)\s+)?"
        r"(?:above|before|previously|prior|so\s+far|earlier)\b",
        r"\b(?:ignore|disregard|forget)\s+(?:all\s+)?(?:of\s+)?the\s+(?:above|foregoing)"
        r"\s*(?:[.,;:!]|$|and\b)",
        # skip / discard / set aside ... all (earlier) instructions: these verbs are also used
        # for install steps, so the instructions must be all / every / your ones or the ones above
        r"\b(?:skip|drop|discard|dismiss|abandon|neglect|overlook|scrap|set\s+aside|throw\s+(?:out|away))\s+"
        r"(?:(?:all|any|every|each|your|these|those)\s+(?:of\s+)?(?:your\s+|the\s+|my\s+)?(?:\w+\s+){0,2}?"
        r"(?:instructions?|prompts?|directives?|directions|rules|guidelines|programming)\b"
        r"|(?:\w+\s+){0,2}?(?:instructions?|prompts?|directives?|rules)\s+(?:above|so\s+far|"
        r"(?:you\s+(?:were|have\s+been)\s+)?given\s+(?:before|earlier|above)))",
        # pay no attention to / do not follow / stop following ... the previous instructions
        r"\b(?:pay\s+no\s+(?:attention|heed|mind)|take\s+no\s+notice|stop\s+(?:following|obeying|listening\s+to)|"
        r"(?:do\s+not|don't|dont|never)\s+(?:follow|obey|listen\s+to|heed|pay\s+(?:any\s+)?attention))\s+"
        r"(?:to\s+)?(?:(?:any|all|each|every)\s+(?:of\s+)?)?(?:the\s+|your\s+|these\s+|those\s+|my\s+)?"
        r"(?:(?:(?:previous|prior|earlier|above|preceding|foregoing|original|initial|system|developer|hidden)\s+)+"
        r"(?:instructions?|prompts?|directions|directives|rules|messages?)\b"
        r"|(?:instructions?|prompts?|directions|directives|rules)\s+(?:above|before\s+this|so\s+far))",
        # repeat the text before "Numbered sources" (the start of our prompt's user part)
        r"\b(?:repeat|print|output|copy|recite|reproduce|return|write\s+out|echo)\b[^.!?\n]{0,80}?"
        r"\b(?:before|above|preceding|prior\s+to|up\s+to|until)\b[^.!?\n]{0,40}?['\"\u201c]?numbered\b",
        r"\b(?:repeat|print|output|copy|recite|reproduce)\b[^.!?\n]{0,60}?\b(?:text|words|everything|content|all)\b"
        r"[^.!?\n]{0,60}?\b(?:before|preceding|prior\s+to)\s+(?:the\s+)?(?:word|phrase|line|heading)\b"
        r"[^.!?\n]{0,60}?\b(?:verbatim|exactly|word\s+for\s+word)\b",
        # reveal/print/show your system prompt / hidden instructions
        r"\b" + _LEAK_VERB + r"\s+(?:me\s+|us\s+)?(?:\w+\s+){0,2}?your\s+"
        r"(?:" + _PROMPT_TARGET + r"|prompt|instructions\s+verbatim)\b",
        r"\bwhat(?:\s+(?:is|are|was|were)|'s|'re)\s+your\s+(?:" + _PROMPT_TARGET + r"|prompt)\b",
        _IMP + _LEAK_VERB + r"\s+(?:me\s+|us\s+)?(?:\w+\s+){0,2}?"
        r"(?:the\s+|any\s+|all\s+)?" + _PROMPT_TARGET + r"\b",
        _IMP + r"(?:repeat|print|output|reveal)\s+(?:me\s+)?"
        r"(?:all\s+|everything\s+|the\s+(?:text|words|content|instructions|prompt)\s+)"
        # "... above." ends the request; "print the text above the table" is a question.
        r"(?:(?:above|before\s+this|so\s+far)(?:\s+verbatim)?\s*(?:[.,;:!?]|$|and\b)|verbatim\b)",
        # personas: DAN, developer mode, unrestricted
        r"\byou\s+are\s+now\s+(?:in\s+|a\s+|an\s+|the\s+)?"
        r"(?:dan|stan|developer\s+mode|dev\s+mode|god\s+mode|jailbreak\s+mode|jailbroken|"
        r"unrestricted|uncensored|unfiltered|unbound|unchained|evil)\b",
        r"\byou\s+are\s+(?:a\s+|an\s+)?(?:dan|jailbroken|unrestricted\s+ai|uncensored\s+ai)\b",
        r"\byou\s+are\s+(?:now\s+)?no\s+longer\s+(?:bound|restricted|limited|constrained)\b",
        r"\b(?:you|chatgpt|assistant|ai|model|claude|gpt|llm|bot)\s+(?:are\s+now\s+|is\s+now\s+)?"
        r"(?:in\s+|with\s+)(?:developer|dev)\s+mode\b",
        r"\b(?:dan|jailbreak)\s+mode\b",
        r"\bdan\b.{0,40}\bdo\s+anything\s+now\b|\bdo\s+anything\s+now\b.{0,40}\bdan\b",
        r"\b(?:act|pretend|roleplay|behave)\s+(?:to\s+be\s+|as\s+|like\s+)(?:a\s+|an\s+)?(?:dan|stan)\b",
        # act as ... without restrictions
        r"(?:" + _IMP + r"|\byou\s+(?:will\s+|to\s+|should\s+|must\s+|shall\s+|now\s+|"
        r"are\s+going\s+to\s+)?)(?:act|behave|roleplay|role-play|respond|answer|reply)"
        r"\b(?:\s+\S+){0,8}?\s+(?:without|with\s+no|free\s+(?:of|from)|ignoring|"
        r"not\s+bound\s+by|unbound\s+by)\s+(?:any\s+|all\s+|your\s+|the\s+|its\s+|"
        r"(?:moral|ethical|content|safety)\s+)*" + _UNRESTRICTED + r"\b",
        r"\bpretend\s+(?:that\s+)?(?:you\s+(?:are|have)|to\s+be)\b(?:\s+\S+){0,6}?\s+"
        r"(?:no|without)\s+(?:any\s+)?(?:rules|" + _UNRESTRICTED_WORDS + r")\b",
        # chat-template role tags and prompt delimiters
        r"<\s*/?\s*(?:system|assistant|developer|sys|system_prompt|instructions)\s*>",
        r"<\|\s*(?:im_start|im_end|system|assistant|user|endoftext|start_header_id|"
        r"end_header_id|eot_id|begin_of_text)\s*\|>",
        r"\[\s*/?\s*(?:inst|sys)\s*\]|<<\s*/?\s*sys\s*>>",
        r"\[\s*system\s+(?:message|prompt|override)\s*\]",
        r"\b(?:begin|end)\s+(?:new\s+)?system\s+(?:prompt|message|instructions?)\b",
        r"\bnew\s+system\s+(?:prompt|instructions?)\s*:",
    )
)
_OTHER_LANGUAGE_PATTERNS: Final[tuple[re.Pattern[str], ...]] = tuple(re.compile(p) for p in _OTHER_LANGUAGES)
# Each _OTHER_LANGUAGES pattern needs one of these words: most questions have none and skip them all.
_OTHER_LANGUAGE_NOUNS: Final = re.compile(
    r"instru|indicacion|indicazion|directric|directiv|direttiv|diretriz|orienta|consigne|invite|anweisung|"
    r"vorgabe|befehl|istruzion|prompt|aanwijzing|opdracht|richtlijn|regels|polece|wskazow|zasad|regul|промпт|подсказк|инструкци|указани|команд|сообщени|"
    r"指令|指示|说明|說明|提示|命令|プロンプト|지시|지침|명령"
)


# Cyrillic, Greek and Armenian letters that look like Latin ones ("ignоre" with a Cyrillic о,
# "ignօre" with an Armenian օ). They are folded only in words that also hold Latin letters:
# Russian, Greek or Armenian words stay as they are.
_LOOKALIKES: Final = "аеорсухіјѕһԁԛԝӏкαοικνρτυχεϲγօսոհցքզ"
_CONFUSABLES: Final = str.maketrans(_LOOKALIKES, "aeopcyxijshdqwlkaoikvptuxecyounhgpq")
_CONFUSABLE: Final = re.compile(f"[{_LOOKALIKES}]")
# Small capitals and other Latin letter forms NFKC leaves alone ("ɪɢɴᴏʀᴇ"): always folded, as
# they are Latin letters and no language writes words with them.
_SMALL_CAPS: Final = str.maketrans("ᴀʙᴄᴅᴇꜰɢʜɪᴊᴋʟᴍɴᴏᴘꞯʀꜱᴛᴜᴠᴡʏᴢıɑɡ", "abcdefghijklmnopqrstuvwyziag")
_WORD: Final = re.compile(r"[^\W\d_]+")
_LATIN: Final = re.compile(r"[a-z]")
# Leetspeak inside words that mix letters and these characters ("1gn0r3"); numbers alone stay.
_LEET_WORD: Final = re.compile(r"(?=[\w@$]*[a-z])(?=[\w@$]*[0-9@$])[\w@$]+")
_LEET: Final = str.maketrans("01345789@$", "oieasttgas")
# Base64 long enough to carry an instruction; decoded and checked once.
_BASE64: Final = re.compile(r"(?<![\w+/=])[A-Za-z0-9+/\-_]{16,}={0,2}(?![\w+/=])")


def _fold_confusables(match: re.Match[str]) -> str:
    word = match.group(0)
    return word.translate(_CONFUSABLES) if _LATIN.search(word) else word


def _strip_latin_marks(text: str) -> str:
    """Drop combining marks on Latin letters: a stroke or accents over "ignore", or "précédentes".

    Only after a Latin letter: Cyrillic й, Japanese dakuten or Hangul are left whole.
    """
    decomposed = unicodedata.normalize("NFKD", text)
    kept: list[str] = []
    base_is_latin = False
    for ch in decomposed:
        if unicodedata.combining(ch) or unicodedata.category(ch) == "Me":
            if base_is_latin:
                continue
        else:
            base_is_latin = "a" <= ch <= "z" or "A" <= ch <= "Z"
        kept.append(ch)
    return unicodedata.normalize("NFKC", "".join(kept))


def _injection_view(text: str) -> str:
    """Fold the text so simple obfuscation does not dodge the patterns.

    NFKC maps full-width and styled letters to ASCII, format characters
    (zero-width joiners etc.) are dropped, combining marks on Latin letters go,
    small capitals become letters, case is folded, Cyrillic, Greek and Armenian
    look-alikes in Latin words become Latin, leetspeak in words is read as
    letters, spelled-out letters are joined, and runs of spaces collapse.
    Only used for matching.
    """
    if text.isascii():  # most questions: nothing to fold but case
        view = text.casefold()
    else:
        view = _strip_latin_marks(text)
        view = "".join(ch for ch in view if unicodedata.category(ch) != "Cf").translate(_SMALL_CAPS).casefold()
        if _CONFUSABLE.search(view):
            view = _WORD.sub(_fold_confusables, view)
    view = _LEET_WORD.sub(lambda m: m.group(0).translate(_LEET), view)
    view = _QUOTES.sub("'", view)
    view = _SPACED_LETTERS.sub(lambda m: _SPACER.sub("", m.group(0)), view)
    return _HSPACE.sub(" ", view)


def _decoded_base64(text: str) -> list[str]:
    """Texts hidden as base64 in the question (the printable ones)."""
    found = []
    for match in _BASE64.finditer(text):
        token = match.group(0).replace("-", "+").replace("_", "/")
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
            decoded = raw.decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            continue
        if decoded and sum(ch.isprintable() or ch.isspace() for ch in decoded) >= 0.9 * len(decoded):
            found.append(decoded)
    return found


def looks_like_injection(text: str, *, decode: bool = True) -> bool:
    view = _injection_view(text)
    if any(p.search(view) for p in _INJECTION_PATTERNS):
        return True
    if _OTHER_LANGUAGE_NOUNS.search(view) is not None and any(p.search(view) for p in _OTHER_LANGUAGE_PATTERNS):
        return True
    # One level of base64: an instruction sent encoded, for the model to decode and follow.
    return decode and any(looks_like_injection(hidden, decode=False) for hidden in _decoded_base64(text))
