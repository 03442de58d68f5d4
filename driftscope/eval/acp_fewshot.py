"""ACPBench MCQ 2-shot chain-of-thought examples, copied verbatim from lm-eval 0.4.13
(`lm_eval/tasks/acpbench/mcq_cot_2shot/<file>.yaml`: the upstream task name and `fewshot_config.samples`,
Apache-2.0), keyed by the data file stem of ../shared/data/benchmarks/acpbench/."""

# The two domains' descriptions, which open every context (upstream repeats them in each sample).
_FERRY = ('This is a ferry domain, where the task is to transport cars from their start to their goal locations, '
          'using a ferry. Each location is accessible by ferry from each other location. The cars can be debarked or '
          'boarded, and the ferry can carry only one car at a time.  ')
_LOGISTICS = ('There are several cities, each containing several locations, some of which are airports. There are '
              'also trucks, which can drive within a single city, and airplanes, which can fly between airports. The '
              'goal is to get some packages from various locations to various new locations.  ')

FEWSHOT = {'act_reach': {'samples': [{'answer': "Let's think step by step.   Step 1: Verify if there is a sequence of "
                                                'actions which transforms the current state into a state where the '
                                                'precondition of the action "embark the car c0 at location l0 on to '
                                                'the ferry" hold. Step 2: The following sequence of actions would '
                                                'transition to such a state: travel by sea from location l0 to '
                                                'location l1, debark the car c1 from the ferry to location l1, travel '
                                                'by sea from location l1 to location l0. **Final Answer**: A.',
                            'context': _FERRY + 'There are 2 locations and 2 cars, numbered consecutively.  '
                                                'Currently, the ferry is at l0, with the car c1 on board. The cars '
                                                'are at locations as follows: c0 is at l0.',
                            'question': 'Which of the following actions can eventually be applied? A. embark the car '
                                        'c0 at location l0 on to the ferry.  B. travel by sea from location c0 to '
                                        'location c1.  C. fly from location l0 to location l1.  D. board the car c0 '
                                        'at location l0 into the airplane.'},
                           {'answer': "Let's think step by step.   Step 1: Verify if there is a sequence of actions "
                                      'which transforms the current state into a state where the precondition of the '
                                      'action "fly the airplane a0 from airport l1-0 to airport l0-0" hold. Step 2: '
                                      'The following sequence of actions would transition to such a state: drive '
                                      'truck t0 from location l0-1 in city c0 to location l0-0 in the same city, fly '
                                      'the airplane a0 from location l0-0 to location l1-0, navigate the truck t1 '
                                      'which is in location l1-0 in city c1 to another location l1-1 in the same '
                                      'city. **Final Answer**: C.',
                            'context': _LOGISTICS + 'There are 2 trucks and 1 airplane, as well as 4 packages. There '
                                                    'are 4 locations across 2 cities.  The locations are in cities as '
                                                    'follows: l1-1 and l1-0 are in c1; l0-0 and l0-1 are in c0.  '
                                                    'Currently, a0 is at l0-0, t0 is at l0-1, p3 and t1 are at l1-0, '
                                                    'p0 is in t1, p2 and p1 are in a0.',
                            'question': 'Which of the following actions can eventually be applied? A. offload the '
                                        'object p3 from the truck p3 at location l1-1.  B. navigate the truck c1 '
                                        'which is in location p0 in city l0-1 to another location t1 in the same '
                                        'city.  C. fly the airplane a0 from airport l1-0 to airport l0-0.  D. fly '
                                        'the airplane a0 to the airport l0-0 in city l1-0.'}],
               'task': 'acp_areach_mcq'},
 'app': {'samples': [{'answer': 'Let\'s think step by step.   Step 1: In order to apply the action "sail from '
                                'location l1 to location l0", the following fact(s) must hold in this state:  The '
                                'ferry is at l1 location Step 2: These facts hold in the mentioned state, so the '
                                'action "sail from location l1 to location l0" is applicable. **Final Answer**: D.',
                      'context': _FERRY + 'There are 2 locations and 2 cars, numbered consecutively.  Currently, the '
                                          'ferry is at l1 location and it is empty. The cars are at locations as '
                                          'follows: c1 and c0 are at l0.',
                      'question': 'Which of the following actions will be applicable in this state? A. unload the '
                                  'car c1 from the ferry to location l1.  B. load the car c0 at location l1 on to '
                                  'the ferry.  C. load the car c0 at location l0 on to the ferry.  D. sail from '
                                  'location l1 to location l0.'},
                     {'answer': 'Let\'s think step by step.   Step 1: In order to apply the action "navigate the '
                                'truck t1 from location l1-1 in city c1 to location l1-1 in the same city", the '
                                'following fact(s) must hold in this state:  t1 is at l1-1 Step 2: These facts hold '
                                'in the mentioned state, so the action "navigate the truck t1 from location l1-1 in '
                                'city c1 to location l1-1 in the same city" is applicable. **Final Answer**: C.',
                      'context': _LOGISTICS + 'There are 2 trucks and 1 airplane, as well as 4 packages. There are 4 '
                                              'locations across 2 cities.  The locations are in cities as follows: '
                                              'l1-1 and l1-0 are in c1; l0-0 and l0-1 are in c0.  Currently, a0 and '
                                              't0 are at l0-0, t1 is at l1-1, p2 is at l1-0, p1 and p3 are in t1, p0 '
                                              'is in t0.',
                      'question': 'Which of the following actions will be applicable in this state? A. load object '
                                  'p1 into airplane a0 at location l1-0.  B. unload the object p2 from the airplane '
                                  'a0 at location l1-0.  C. navigate the truck t1 from location l1-1 in city c1 to '
                                  'location l1-1 in the same city.  D. operate the airplane a0 from airport l1-0 to '
                                  'airport l0-0.'}],
         'task': 'acp_app_mcq'},
 'just': {'samples': [{'answer': "Let's think step by step.   Step 1: A valid plan is a sequence of actions that is "
                                 'exectuable from the current state and achieves the goal.  Step 2: The 2nd instance '
                                 'of  "travel by sea from location l1 to location l0" can be removed from the plan '
                                 'and still have a valid plan. **Final Answer**: C.',
                       'context': _FERRY + 'There are 2 locations and 2 cars, numbered consecutively.  Currently, the '
                                           'ferry is at l0 location and it is empty. The cars are at locations as '
                                           'follows: c0 and c1 are at l0. The goal is to reach a state where the '
                                           'following facts hold: Car c1 is at location l1 and Car c0 is at location '
                                           'l1.',
                       'question': 'Given the plan: \\"board the car c0 at the location l0, travel by sea from '
                                   'location l0 to location l1, unload the car c0 from the ferry to location l1, '
                                   'travel by sea from location l1 to location l0, board the car c1 at location l0, '
                                   'sail from location l0 to location l1, debark the car c1 from the ferry to '
                                   'location l1, travel by sea from location l1 to location l0\\"; which of the '
                                   'following actions can be removed from this plan and still have a valid plan?  A. '
                                   'board the car c1 at the location l0.  B. debark car c1 to location l1 from the '
                                   'ferry.  C. travel by sea from location l1 to location l0.  D. sail from location '
                                   'l0 to location l1.'},
                      {'answer': "Let's think step by step.   Step 1: A valid plan is a sequence of actions that is "
                                 'exectuable from the current state and achieves the goal.  Step 2: Consecutive '
                                 'actions "drive the truck t0 in city c0 from location l0-1 to location l0-0 and '
                                 'navigate the truck t0 which is in location l0-0 in city c0 to another location '
                                 'l0-1 in the same city" can be removed from the plan and still have a valid plan. '
                                 '**Final Answer**: A.',
                       'context': _LOGISTICS + 'There are 2 trucks and 1 airplane, as well as 4 packages. There are 4 '
                                               'locations across 2 cities.  The locations are in cities as follows: '
                                               'l0-0 and l0-1 are in c0; l1-0 and l1-1 are in c1.  Currently, p2, p1, '
                                               'and p3 are at l1-0, p0 and t1 are at l1-1, a0 is at l0-0, t0 is at '
                                               'l0-1. The goal is to reach a state where the following facts hold: p3 '
                                               'is at l0-1, p0 is at l0-0, p2 is at l1-0, and p1 is at l1-0.',
                       'question': 'Given the plan: \\"load object p0 into truck t1 at location l1-1, navigate the '
                                   'truck t1 which is in location l1-1 in city c1 to another location l1-0 in the '
                                   'same city, offload the object p0 from the truck t1 at location l1-0, fly the '
                                   'airplane a0 from location l0-0 to location l1-0, load object p0 into airplane a0 '
                                   'at location l1-0, place the object p3 onto the airplane a0 at location l1-0, fly '
                                   'the airplane a0 from location l1-0 to location l0-0, unload the object p0 from '
                                   'the airplane a0 at location l0-0, unload the object p3 from the airplane a0 at '
                                   'location l0-0, navigate the truck t0 from location l0-1 in city c0 to location '
                                   'l0-0 in the same city, load object p3 into truck t0 at location l0-0, drive '
                                   'truck t0 from location l0-0 in city c0 to location l0-1 in the same city, '
                                   'offload the object p3 from the truck t0 at location l0-1, drive truck t0 from '
                                   'location l0-1 in city c0 to location l0-0 in the same city, navigate the truck '
                                   't0 from its current location l0-0 in city c0 to the new location l0-1 within the '
                                   'same city\\"; which of the following pair of consecutive actions can be removed '
                                   'from this plan and still have a valid plan?  A. drive the truck t0 in city c0 '
                                   'from location l0-1 to location l0-0 and navigate the truck t0 which is in '
                                   'location l0-0 in city c0 to another location l0-1 in the same city.  B. unload '
                                   'object p3 from truck t0 at location l0-1 and drive truck t0 from location l0-1 '
                                   'in city c0 to location l0-0 in the same city.  C. drive truck t0 from location '
                                   'l0-1 in city c0 to location l0-0 in the same city and load the object p3 from '
                                   'location l0-0 into the truck t0.  D. unload the object p0 from the airplane a0 '
                                   'at location l0-0 and remove the object p3 from the airplane a0 and place it on '
                                   'the location l0-0.'}],
          'task': 'acp_just_mcq'},
 'land': {'samples': [{'answer': "Let's think step by step.   Step 1: A fact is a landmark if it must hold at some "
                                 'point along any plan. Step 2: The fact "Ferry has car c1 on board" can be found by '
                                 'a simple procedure that traces back such atoms from the goal. **Final Answer**: C.',
                       'context': _FERRY + 'There are 2 locations and 2 cars, numbered consecutively.  Currently, the '
                                           'ferry is at l0 location and it is empty. The cars are at locations as '
                                           'follows: c1 is at l0; c0 is at l1. The goal is to reach a state where the '
                                           'following facts hold: Car c1 is at location l1 and Car c0 is at location '
                                           'l1.',
                       'question': 'Which of the following facts is a landmark (must hold at some point along any '
                                   'plan) for the current state? A. Car c0 is on the ferry.  B. Ferry has car c1 on '
                                   'board and Car c0 is at location l0.  C. Ferry has car c1 on board.  D. Ferry has '
                                   'car c1 on board and Car c0 is on the ferry.'},
                      {'answer': "Let's think step by step.   Step 1: A fact is a landmark if it must hold at some "
                                 'point along any plan. Step 2: The fact "p3 is at l0-0" can be found by a simple '
                                 'procedure that traces back such atoms from the goal. **Final Answer**: A.',
                       'context': _LOGISTICS + 'There are 2 trucks and 1 airplane, as well as 4 packages. There are 4 '
                                               'locations across 2 cities.  The locations are in cities as follows: '
                                               'l1-1 and l1-0 are in c1; l0-1 and l0-0 are in c0.  Currently, p1 and '
                                               't0 are at l0-0, a0, p0, p3, and p2 are at l1-0, t1 is at l1-1. The '
                                               'goal is to reach a state where the following facts hold: p0 is at '
                                               'l0-0, p1 is at l1-0, p3 is at l0-1, and p2 is at l1-0.',
                       'question': 'Which of the following facts is a landmark (must hold at some point along any '
                                   'plan) for the current state? A. p3 is at l0-0.  B. p1 is at l0-1.  C. p0 is in '
                                   't0.  D. p2 is in a0.'}],
          'task': 'acp_land_mcq'},
 'prog': {'samples': [{'answer': "Let's think step by step.   Step 1: The following fact(s) do not hold in the "
                                 'current state: The ferry is at l0 location. Step 2: The action adds the following '
                                 'fact(s): The ferry is at l0 location Step 3: The following fact(s) hold in the '
                                 'current state: Car c0 is at location l1. Step 4: The action deletes the following '
                                 'fact(s): The ferry is at l1 location Step 5: Fact(s) "The ferry is at l0 location" '
                                 'are added and Fact(s) "Car c0 is at location l1" are not deleted. **Final '
                                 'Answer**: D.',
                       'context': _FERRY + 'There are 2 locations and 2 cars, numbered consecutively.  Currently, the '
                                           'ferry is at l1, with the car c1 on board. The cars are at locations as '
                                           'follows: c0 is at l1.',
                       'question': 'Which the following facts hold after performing the action \\"travel by sea from '
                                   'location l1 to location l0\\" in the current state? **Possible Answers**: A. Car '
                                   'c0 is at location l1 and The ferry is at l1 location.  B. The ferry is at l0 '
                                   'location and The ferry is at l1 location.  C. The ferry is at l0 location.  D. '
                                   'The ferry is at l0 location and Car c0 is at location l1.'},
                      {'answer': "Let's think step by step.   Step 1: The following fact(s) hold in the current "
                                 'state: a0 is at l0-0. Step 2: The action deletes the following fact(s): t0 is at '
                                 'l0-1 Step 3: Fact(s) "a0 is at l0-0" are not deleted. **Final Answer**: C.',
                       'context': _LOGISTICS + 'There are 2 trucks and 1 airplane, as well as 4 packages. There are 4 '
                                               'locations across 2 cities.  The locations are in cities as follows: '
                                               'l1-1 and l1-0 are in c1; l0-1 and l0-0 are in c0.  Currently, a0 is '
                                               'at l0-0, t1 and p0 are at l1-1, t0 is at l0-1, p1 is in t1, p2 and p3 '
                                               'are in a0.',
                       'question': 'Which the following facts hold after performing the action \\"drive truck t0 '
                                   'from location l0-1 in city c0 to location l0-1 in the same city\\" in the '
                                   'current state? A. p3 is in t1.  B. a0 is at l0-0 and p3 is in t1.  C. a0 is at '
                                   'l0-0.  D. None of the above.'}],
          'task': 'acp_prog_mcq'},
 'reach': {'samples': [{'answer': "Let's think step by step.   Step 1: Verify if the following facts hold in the "
                                  'current state:  There are no cars on the ferry and The ferry is at l1 location. '
                                  'Step 2: These facts do not hold. Step 3: Verify if there is a sequence of actions '
                                  'which transforms the current state into a state where these facts hold. Step 4: '
                                  'The following sequence of actions would transition to such a state: debark the '
                                  'car c0 from the ferry to location l0, sail from location l0 to location l1. '
                                  '**Final Answer**: A.',
                        'context': _FERRY + 'There are 2 locations and 2 cars, numbered consecutively.  Currently, '
                                            'the ferry is at l0, with the car c0 on board. The cars are at locations '
                                            'as follows: c1 is at l1.',
                        'question': 'Which of the following options can hold in a state that can potentially be '
                                    'reached? A. There are no cars on the ferry and The ferry is at l1 location.  B. '
                                    'Car l1 is at location c1.  C. Ferry has car c0 on board and There are no cars '
                                    'on the ferry.  D. The ferry is at c0 location and Car c1 is at location l1.'},
                       {'answer': "Let's think step by step.   Step 1: Verify if the following fact holds in the "
                                  'current state:  t0 is at l0-0. Step 2: The fact does not hold. Step 3: Verify if '
                                  'there is a sequence of actions which transforms the current state into a state '
                                  'where the fact holds. Step 4: The following sequence of actions would transition '
                                  'to such a state: drive the truck t0 in city c0 from location l0-1 to location '
                                  'l0-0, navigate the truck t0 which is in location l0-0 in city c0 to another '
                                  'location l0-0 in the same city. **Final Answer**: B.',
                        'context': _LOGISTICS + 'There are 2 trucks and 1 airplane, as well as 4 packages. There are '
                                                '4 locations across 2 cities.  The locations are in cities as '
                                                'follows: l1-1 and l1-0 are in c1; l0-0 and l0-1 are in c0.  '
                                                'Currently, p1 and t1 are at l1-1, a0 and p0 are at l0-0, t0 and p3 '
                                                'are at l0-1, p2 is at l1-0.',
                        'question': 'Which of the following options can hold in a state that can potentially be '
                                    'reached? A. p2 is at p0.  B. t0 is at l0-0.  C. p3 is in t1 and p3 is in t0.  '
                                    'D. l1-1 is at p1.'}],
           'task': 'acp_reach_mcq'},
 'val': {'samples': [{'answer': "Let's think step by step.   Step 1: For a sequence of actions to be a plan, all "
                                'actions should be valid, applicable in sequence, and achieve the goal. Step 2: The '
                                'action sequence is applicable and it achieves the goal. **Final Answer**: B.',
                      'context': _FERRY + 'There are 2 locations and 2 cars, numbered consecutively.  Currently, the '
                                          'ferry is at l0 location and it is empty. The cars are at locations as '
                                          'follows: c1 and c0 are at l0. The goal is to reach a state where the '
                                          'following facts hold: Car c0 is at location l1 and Car c1 is at location '
                                          'l1.',
                      'question': 'Which of the following claims is true with regard to the following sequence of '
                                  'actions \\"board the car c0 at the location l0, travel by sea from location l0 to '
                                  'location l1, unload the car c0 from the ferry to location l1, travel by sea from '
                                  'location l1 to location l0, board the car c1 at location l0, sail from location '
                                  'l0 to location l1, debark the car c1 from the ferry to location l1\\" and the '
                                  'current state? A.  The sequence is not applicable.  B. The sequence is a plan.  '
                                  'C. The sequence is applicable, but does not achieve the goal.  D. The sequence is '
                                  'not valid.'},
                     {'answer': "Let's think step by step.   Step 1: For a sequence of actions to be a plan, all "
                                'actions should be valid, applicable in sequence, and achieve the goal. Step 2: The '
                                'action "sail the ship t0 into city c0 from location l0-2 in city l0-0" is not valid '
                                'in this problem. **Final Answer**: A.',
                      'context': _LOGISTICS + 'There are 3 trucks and 1 airplane, as well as 4 packages. There are 9 '
                                              'locations across 3 cities.  The locations are in cities as follows: '
                                              'l1-2, l1-0, and l1-1 are in c1; l0-0, l0-1, and l0-2 are in c0; l2-1, '
                                              'l2-2, and l2-0 are in c2.  Currently, p2 and t1 are at l1-2, p3 is at '
                                              'l2-0, t0 and p0 are at l0-2, p1 is at l1-0, a0 is at l0-0, t2 is at '
                                              'l2-2. The goal is to reach a state where the following facts hold: p1 '
                                              'is at l1-0, p3 is at l2-0, p2 is at l0-1, and p0 is at l1-2.',
                      'question': 'Which of the following claims is true with regard to the following sequence of '
                                  'actions \\"load object p0 into truck t0 at location l0-2, sail the ship t0 into '
                                  'city c0 from location l0-2 in city l0-0, remove the object p0 from the truck t0 '
                                  'and place it on the location l0-0, load the object p0 from location l0-0 onto the '
                                  'airplane a0, fly the airplane a0 from the airport l0-0 to the airport l1-0, '
                                  'remove the object p0 from the airplane a0 and place it on the location l1-0, load '
                                  'object p2 into truck t1 at location l1-2, navigate the truck t1 from its current '
                                  'location l1-2 in city c1 to the new location l1-0 within the same city place the '
                                  'object p0 into the truck t1 at location l1-0 remove the object p2 from the truck '
                                  't1 and place it on the location l1-0 load the object p2 from location l1-0 onto '
                                  'the airplane a0 fly the airplane a0 from location l1-0 to location l2-0 fly '
                                  'airplane a0 from airport l2-0 to airport l0-0 unload the object p2 from the '
                                  'airplane a0 at location l0-0 place the object p2 into the truck t0 at location '
                                  'l0-0 navigate the truck t0 from its current location l0-0 in city c0 to the new '
                                  'location l0-1 within the same city offload the object p2 from the truck t0 at '
                                  'location l0-1 drive the truck t1 in city c1 from location l1-0 to location l1-2 '
                                  'offload the object p0 from the truck t1 at location l1-2 navigate the truck t2 '
                                  'from its current location l2-2 in city c2 to the new location l2-1 within the '
                                  'same city\\" and the current state? A. The sequence is not valid.  B. The '
                                  'sequence is applicable, but does not achieve the goal.  C. The sequence is a '
                                  'plan.  D.  The sequence is not applicable.'}],
         'task': 'acp_val_mcq'}}
