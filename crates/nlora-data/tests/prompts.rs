//! Rendered prompts equal the reference's text, character for character,
//! for one real training record of each task type.
mod common;

use nlora_data::{LoadOptions, PromptStyle, PromptTemplate};

/// (task, record index in train.json, expected label, prompt without prefix)
/// The strings are the reference's `instruction.format(sentence)` with the
/// instruction of instruction_config.json written out by hand.
const CASES: [(&str, usize, &str, &str); 8] = [
    (
        "agnews",
        1048,
        "Sports",
        "What is the topic of the following paragraph? Choose one from the option.\nOption: World, Sports, Business, Science or Technology \nTitle: Theme park\nText: Leave it to the greatest rivalry in sports to nearly turn a lovefest into an alley fight.\n\nAnswer:",
    ),
    (
        "SST-2",
        1017,
        "Good",
        "What is the sentiment of the following paragraph? Choose one from the option.\nOption: Good, Bad \nText: stay \nAnswer:",
    ),
    (
        "RTE",
        276,
        "entailment",
        "What is the logical relationship between the \"sentence 1\" and the \"sentence 2\"? Choose one from the option.\nOption: contradiction, entailment \nsentence 1: Yemen, too, was reunified in 1990.\nsentence 2: Yemen was reunited in 1990.\nAnswer:",
    ),
    (
        "QQP",
        1327,
        "True",
        "Whether the \"first sentence\" and the \"second sentence\" have the same meaning? Choose one from the option.\nOption: False, True \nfirst sentence: What is a slab?\nsecond sentence: What is slab?\nAnswer:",
    ),
    (
        "BoolQA",
        341,
        "False",
        "According to the following passage, is the question true or false? Choose one from the option.\nOption: True, False \nquestion: were there any survivors on the andrea gail\npassage: Andrea Gail -- All six of the crew were lost at sea.\nAnswer:",
    ),
    (
        "MultiRC",
        1147,
        "False",
        "According to the following passage and question, is the candidate answer true or false? Choose one from the option.\nOption: False, True \nparagraph: Mike and Jeff are close friends. Their school is having a guessing game to guess how many gumballs are in a box. If they get the right amount they win $100. If they get close they get a $20 gift card. The box looks like it is missing some gumballs. It turns out some people are eating them when they place their guess. 100 people guessed and took a piece of candy. The box is 10\" by 10\" by 10\". Each gumball is 1\" each. Mike guessed 500. Jeff guessed 800. They both said they would split their money they win, if they win. \nquestion: Roughly how many gumballs are missing?\ncandidate answer: No missing\nAnswer:",
    ),
    (
        "WiC",
        1172,
        "True",
        "Given a word and two sentences, whether the word is used with the same sense in both sentence? Choose one from the option.\nOption: True, False \nword: play\nPlay safe.\nPlay fair.\nAnswer:",
    ),
    (
        "COPA",
        331,
        "B",
        "Which sentence is the cause of \"The bar closed.\"? Choose one between A and B.\nA: It was crowded.\nB: It was 3 AM.\nAnswer:",
    ),
];

const PREFIXES: [&str; 8] = [
    "Task:TC\nDataset:agnews\n",
    "Task:SC\nDataset:SST-2\n",
    "Task:NLI\nDataset:RTE\n",
    "Task:QQP\nDataset:QQP\n",
    "Task:BoolQA\nDataset:BoolQA\n",
    "Task:MultiRC\nDataset:MultiRC\n",
    "Task:WiC\nDataset:WiC\n",
    "Task:COPA\nDataset:COPA\n",
];

#[test]
fn prompts_match_the_reference_text_with_and_without_prefix() {
    let bench = common::benchmark();
    for ((name, index, label, bare), prefix) in CASES.iter().zip(PREFIXES) {
        let task = bench.load_task(name, &LoadOptions::default()).unwrap();
        let example = task.train.iter().find(|e| e.index == *index).unwrap();
        assert_eq!(example.label, *label, "{name}");

        let plain = PromptTemplate::for_task(&task, bench.instructions(), PromptStyle::BARE)
            .unwrap()
            .apply(example);
        assert_eq!(plain.text, *bare, "{name} without prefix");
        assert_eq!(plain.label, *label);

        let prefixed =
            PromptTemplate::for_task(&task, bench.instructions(), PromptStyle::default())
                .unwrap()
                .apply(example);
        assert_eq!(
            prefixed.text,
            format!("{prefix}{bare}"),
            "{name} with prefix"
        );
        // The sentence span points at the record's sentence, the tail is the cue.
        assert_eq!(prefixed.sentence_text(), example.sentence);
        assert_eq!(prefixed.tail(), "\nAnswer:");
        assert!(prefixed.head().starts_with(prefix));
    }
}

#[test]
fn prefix_lines_can_be_chosen_separately() {
    let bench = common::benchmark();
    let task = bench.load_task("SST-2", &LoadOptions::default()).unwrap();
    let example = task.train.iter().find(|e| e.index == 1017).unwrap();
    let render = |task_name, dataset_name| {
        PromptTemplate::for_task(
            &task,
            bench.instructions(),
            PromptStyle {
                task_name,
                dataset_name,
            },
        )
        .unwrap()
        .render(&example.sentence)
    };
    let body = "What is the sentiment of the following paragraph? Choose one from the option.\nOption: Good, Bad \nText: stay \nAnswer:";
    assert_eq!(render(true, false), format!("Task:SC\n{body}"));
    assert_eq!(render(false, true), format!("Dataset:SST-2\n{body}"));
}
