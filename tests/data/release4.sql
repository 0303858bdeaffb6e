-- made by tests/data/make_release4.sh (commit 21d1755's code); photo paths start with @PHOTOS@
BEGIN TRANSACTION;
CREATE TABLE adapters (
	id INTEGER NOT NULL, 
	base_model VARCHAR NOT NULL, 
	path VARCHAR NOT NULL, 
	export_hash VARCHAR NOT NULL, 
	hyperparams_json TEXT, 
	metrics_json TEXT, 
	active BOOLEAN NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE calibrations (
	id INTEGER NOT NULL, 
	stage1_version VARCHAR NOT NULL, 
	vlm_version VARCHAR NOT NULL, 
	temperature_stage1 FLOAT NOT NULL, 
	temperature_vlm FLOAT NOT NULL, 
	weight FLOAT NOT NULL, 
	n_reviews INTEGER NOT NULL, 
	temperature_fused FLOAT DEFAULT '1.0' NOT NULL, 
	report_json TEXT, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "calibrations" VALUES(1,'cb7463c994ca-labelse425ae81','llava-tiny@d6af05217a-p1',1.4,0.9,0.55,30,1.1,'{"note": "fixture"}','2026-12-02 00:43:28.725323');
CREATE TABLE exports (
	id INTEGER NOT NULL, 
	out_dir VARCHAR NOT NULL, 
	content_hash VARCHAR NOT NULL, 
	n_records INTEGER NOT NULL, 
	seed INTEGER NOT NULL, 
	options_json TEXT, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "exports" VALUES(1,'/tmp/r4/export','03679a863fd09f87d6828f6bb41ad8c1be6eb97ac86fa8c0fa7275d905a50917',7,0,'{"seed": 0, "image_size": 336, "cap_per_breed": null, "oversample_train": false, "oversample_max_factor": 10, "resplit": false, "fractions": [0.8, 0.1, 0.1], "imported_confidence": 0.8, "jpeg_quality": 95, "processor": "LlavaProcessor", "max_length": null, "rows_per_split": {"train": 7, "validation": 0, "test": 0}, "skipped": {"Unsure": 1, "Not a cat": 1}, "n_failed": 0}','2026-12-02 00:43:49.614825');
CREATE TABLE images (
	id INTEGER NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	path VARCHAR NOT NULL, 
	size INTEGER NOT NULL, 
	width INTEGER, 
	height INTEGER, 
	error TEXT, 
	imported_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "images" VALUES(1,'f52f1e5c635baf1b2d60c2105b9dd64d3b9386eb30581cd798d706eb4c644925','@PHOTOS@/Birman_121.jpg',33884,500,333,NULL,'2026-12-02 00:42:45.907126');
INSERT INTO "images" VALUES(2,'059916258a3ff48645daa656cace686a213c0580ded6c2d2925e8057725d57cc','@PHOTOS@/Bengal/Bengal_1.jpg',33416,341,512,NULL,'2026-12-02 00:42:45.920279');
INSERT INTO "images" VALUES(3,'7ca8784b6ab820b05f68eb7075677ae932d026064e554c0920e4ad67c6b70843','@PHOTOS@/Bengal/Bengal_100.jpg',58514,500,333,NULL,'2026-12-02 00:42:45.941624');
INSERT INTO "images" VALUES(4,'5cafdfe659a555ed672074b9b4c773ec553cdfef034415848a1585428e771c6e','@PHOTOS@/Bengal/Bengal_111.jpg',76717,500,433,NULL,'2026-12-02 00:42:45.954263');
INSERT INTO "images" VALUES(5,'c04bee9d659201c6647cbc29f7c2e1556b8370c54f4a50a32d84ceab2fddf6cd','@PHOTOS@/Bengal/broken.jpg',13,NULL,NULL,'not a readable image (jpg file)','2026-12-02 00:42:46.594271');
INSERT INTO "images" VALUES(6,'d5385817a44895ff387056a50558016f50d7dba3e88e7fb76c9e64be8914bf4a','@PHOTOS@/Persian/Persian_106.jpg',84304,398,500,NULL,'2026-12-02 00:42:46.605042');
INSERT INTO "images" VALUES(7,'cbac8baf7f5ce858e60ca67189d09445f7425c10b8605df0804215438391cbd9','@PHOTOS@/Persian/Persian_114.jpg',47900,500,439,NULL,'2026-12-02 00:42:46.617137');
INSERT INTO "images" VALUES(8,'a2bd93a10fdee45148eb2fc565ae652b32a1dcd171ef1483662ada64e08109e1','@PHOTOS@/Persian/Persian_128.jpg',42615,500,334,NULL,'2026-12-02 00:42:46.632684');
INSERT INTO "images" VALUES(9,'a77464eeb1558822fed5c27abaf2a90071285cd6a0d1eb7f070dbbdacf3f62f8','@PHOTOS@/Siamese/Siamese_108.jpg',48433,500,378,NULL,'2026-12-02 00:42:46.647618');
INSERT INTO "images" VALUES(10,'59535633f7f381015f7578fefd5d1f1ed0abd80d7c1c881f061e894d185bc5d2','@PHOTOS@/Siamese/Siamese_109.jpg',51145,500,399,NULL,'2026-12-02 00:42:46.664191');
INSERT INTO "images" VALUES(11,'b893d3926da99efc8bdb461ccab65b58a08bc446a40a60f21d899eef3dad0451','@PHOTOS@/Siamese/Siamese_115.jpg',38547,500,335,NULL,'2026-12-02 00:42:46.682653');
CREATE TABLE predictions (
	id INTEGER NOT NULL, 
	image_id INTEGER NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	model_id VARCHAR NOT NULL, 
	model_version VARCHAR NOT NULL, 
	input_key VARCHAR NOT NULL, 
	payload_json TEXT NOT NULL, 
	seconds FLOAT NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_prediction_key UNIQUE (image_id, kind, model_id, model_version, input_key), 
	FOREIGN KEY(image_id) REFERENCES images (id)
);
INSERT INTO "predictions" VALUES(1,1,'stage1','convnext_atto','cb7463c994ca-labelse425ae81','','{"topk": [["Silver", 0.052963968366384506], ["Cymric", 0.030122267082333565], ["Domestic Long Hair", 0.0283175278455019]]}',1.92258398800004226547e-01,'2026-12-02 00:43:11.946176');
INSERT INTO "predictions" VALUES(2,2,'stage1','convnext_atto','cb7463c994ca-labelse425ae81','','{"topk": [["Nebelung", 0.03332241624593735], ["Tonkinese", 0.028010457754135132], ["Tuxedo", 0.027561940252780914]]}',1.92258398800004226547e-01,'2026-12-02 00:43:11.947052');
INSERT INTO "predictions" VALUES(3,3,'stage1','convnext_atto','cb7463c994ca-labelse425ae81','','{"topk": [["Abyssinian", 0.03544728830456734], ["Havana", 0.027659688144922256], ["Japanese Bobtail", 0.023156682029366493]]}',1.92258398800004226547e-01,'2026-12-02 00:43:11.947415');
INSERT INTO "predictions" VALUES(4,4,'stage1','convnext_atto','cb7463c994ca-labelse425ae81','','{"topk": [["Tuxedo", 0.036112550646066666], ["Nebelung", 0.033923178911209106], ["Sphynx - Hairless Cat", 0.02482609637081623]]}',1.92258398800004226547e-01,'2026-12-02 00:43:11.947630');
INSERT INTO "predictions" VALUES(5,6,'stage1','convnext_atto','cb7463c994ca-labelse425ae81','','{"topk": [["Calico", 0.03269895166158676], ["Abyssinian", 0.02877410501241684], ["Selkirk Rex", 0.02650371752679348]]}',1.92258398800004226547e-01,'2026-12-02 00:43:11.951991');
INSERT INTO "predictions" VALUES(6,7,'stage1','convnext_atto','cb7463c994ca-labelse425ae81','','{"topk": [["Nebelung", 0.0376792810857296], ["Tonkinese", 0.031356263905763626], ["Tuxedo", 0.030237628147006035]]}',1.92258398800004226547e-01,'2026-12-02 00:43:11.953186');
INSERT INTO "predictions" VALUES(7,8,'stage1','convnext_atto','cb7463c994ca-labelse425ae81','','{"topk": [["Torbie", 0.02850591577589512], ["Selkirk Rex", 0.0272542554885149], ["Domestic Long Hair", 0.026631370186805725]]}',1.92258398800004226547e-01,'2026-12-02 00:43:11.953737');
INSERT INTO "predictions" VALUES(8,9,'stage1','convnext_atto','cb7463c994ca-labelse425ae81','','{"topk": [["Calico", 0.03328869491815567], ["Selkirk Rex", 0.02758960612118244], ["Abyssinian", 0.025181664153933525]]}',1.92258398800004226547e-01,'2026-12-02 00:43:11.954346');
INSERT INTO "predictions" VALUES(9,10,'stage1','convnext_atto','cb7463c994ca-labelse425ae81','','{"topk": [["Nebelung", 0.026563610881567], ["Tonkinese", 0.02450963295996189], ["American Wirehair", 0.024365998804569244]]}',1.92258398800004226547e-01,'2026-12-02 00:43:11.954713');
INSERT INTO "predictions" VALUES(10,11,'stage1','convnext_atto','cb7463c994ca-labelse425ae81','','{"topk": [["Abyssinian", 0.035391151905059814], ["Havana", 0.025441402569413185], ["Calico", 0.02399042434990406]]}',1.92258398800004226547e-01,'2026-12-02 00:43:11.955051');
INSERT INTO "predictions" VALUES(11,1,'vlm','/tmp/release4/.cache/demo-models/llava-tiny','llava-tiny@d6af05217a-p1','["Silver","Cymric","Domestic Long Hair"]','{"candidates": ["Silver", "Cymric", "Domestic Long Hair", "other"], "probabilities": [0.39971117626921215, 0.1482310440155812, 0.19758287276496947, 0.25447490695023717], "scores": [-6.826807022094727, -7.818777084350586, -7.531391143798828, -7.278347015380859], "label": "Silver", "confidence": 0.39971117626921215}',3.19842016250049709924e-01,'2026-12-02 00:43:14.575178');
INSERT INTO "predictions" VALUES(12,2,'vlm','/tmp/release4/.cache/demo-models/llava-tiny','llava-tiny@d6af05217a-p1','["Nebelung","Tonkinese","Tuxedo"]','{"candidates": ["Nebelung", "Tonkinese", "Tuxedo", "other"], "probabilities": [0.24733456034507678, 0.20489195485168626, 0.30534664511442466, 0.2424268396888123], "scores": [-7.882519721984863, -8.070778846740723, -7.67181396484375, -7.902561664581299], "label": "Tuxedo", "confidence": 0.30534664511442466}',3.19842016250049709924e-01,'2026-12-02 00:43:14.575375');
INSERT INTO "predictions" VALUES(13,3,'vlm','/tmp/release4/.cache/demo-models/llava-tiny','llava-tiny@d6af05217a-p1','["Abyssinian","Havana","Japanese Bobtail"]','{"candidates": ["Abyssinian", "Havana", "Japanese Bobtail", "other"], "probabilities": [0.37366375106534, 0.13804742994745606, 0.1437465542626998, 0.34454226472450417], "scores": [-6.428901672363281, -7.424660682678223, -7.384206295013428, -6.510041236877441], "label": "Abyssinian", "confidence": 0.37366375106534}',3.19842016250049709924e-01,'2026-12-02 00:43:14.575501');
INSERT INTO "predictions" VALUES(14,4,'vlm','/tmp/release4/.cache/demo-models/llava-tiny','llava-tiny@d6af05217a-p1','["Tuxedo","Nebelung","Sphynx - Hairless Cat"]','{"candidates": ["Tuxedo", "Nebelung", "Sphynx - Hairless Cat", "other"], "probabilities": [0.27320511063607444, 0.23805421325774043, 0.1737812551820052, 0.31495942092417994], "scores": [-6.999485015869141, -7.137209415435791, -7.451910495758057, -6.857264041900635], "label": "other", "confidence": 0.31495942092417994}',3.19842016250049709924e-01,'2026-12-02 00:43:14.575618');
INSERT INTO "predictions" VALUES(15,6,'vlm','/tmp/release4/.cache/demo-models/llava-tiny','llava-tiny@d6af05217a-p1','["Calico","Abyssinian","Selkirk Rex"]','{"candidates": ["Calico", "Abyssinian", "Selkirk Rex", "other"], "probabilities": [0.0964215846818849, 0.2232182351359448, 0.2477820692718173, 0.43257811091035286], "scores": [-7.893587112426758, -7.0541672706604, -6.949767589569092, -6.39255428314209], "label": "other", "confidence": 0.43257811091035286}',3.19842016250049709924e-01,'2026-12-02 00:43:14.575730');
INSERT INTO "predictions" VALUES(16,7,'vlm','/tmp/release4/.cache/demo-models/llava-tiny','llava-tiny@d6af05217a-p1','["Nebelung","Tonkinese","Tuxedo"]','{"candidates": ["Nebelung", "Tonkinese", "Tuxedo", "other"], "probabilities": [0.1935521335091676, 0.14931957905592647, 0.3008045075643772, 0.3563237798705287], "scores": [-7.513403415679932, -7.772861480712891, -7.0724897384643555, -6.903110504150391], "label": "other", "confidence": 0.3563237798705287}',3.19842016250049709924e-01,'2026-12-02 00:43:14.575908');
INSERT INTO "predictions" VALUES(17,8,'vlm','/tmp/release4/.cache/demo-models/llava-tiny','llava-tiny@d6af05217a-p1','["Torbie","Selkirk Rex","Domestic Long Hair"]','{"candidates": ["Torbie", "Selkirk Rex", "Domestic Long Hair", "other"], "probabilities": [0.05693017671138675, 0.41179875359135343, 0.11867825327382238, 0.41259281642343754], "scores": [-8.66452693939209, -6.685817718505859, -7.929936408996582, -6.683891296386719], "label": "other", "confidence": 0.41259281642343754}',3.19842016250049709924e-01,'2026-12-02 00:43:14.576029');
INSERT INTO "predictions" VALUES(18,9,'vlm','/tmp/release4/.cache/demo-models/llava-tiny','llava-tiny@d6af05217a-p1','["Calico","Selkirk Rex","Abyssinian"]','{"candidates": ["Calico", "Selkirk Rex", "Abyssinian", "other"], "probabilities": [0.10229244521186166, 0.2856487231580447, 0.14278227925891077, 0.46927655237118304], "scores": [-7.779820919036865, -6.752893924713135, -7.446335792541504, -6.25646448135376], "label": "other", "confidence": 0.46927655237118304}',3.19842016250049709924e-01,'2026-12-02 00:43:14.576163');
INSERT INTO "predictions" VALUES(19,10,'vlm','/tmp/release4/.cache/demo-models/llava-tiny','llava-tiny@d6af05217a-p1','["Nebelung","Tonkinese","American Wirehair"]','{"candidates": ["Nebelung", "Tonkinese", "American Wirehair", "other"], "probabilities": [0.2336677153916153, 0.28587441709941697, 0.2727939406373597, 0.20766392687160815], "scores": [-8.245662689208984, -8.044010162353516, -8.090846061706543, -8.363641738891602], "label": "Tonkinese", "confidence": 0.28587441709941697}',2.48878406499898119363e-01,'2026-12-02 00:43:15.082158');
INSERT INTO "predictions" VALUES(20,11,'vlm','/tmp/release4/.cache/demo-models/llava-tiny','llava-tiny@d6af05217a-p1','["Abyssinian","Havana","Calico"]','{"candidates": ["Abyssinian", "Havana", "Calico", "other"], "probabilities": [0.37572351345918326, 0.10771400615177633, 0.1315360644709274, 0.385026415918113], "scores": [-6.628779888153076, -7.8781538009643555, -7.678352355957031, -6.604321479797363], "label": "other", "confidence": 0.385026415918113}',2.48878406499898119363e-01,'2026-12-02 00:43:15.083101');
CREATE TABLE preferences (
	id INTEGER NOT NULL, 
	image_id INTEGER NOT NULL, 
	annotator VARCHAR NOT NULL, 
	model_a VARCHAR NOT NULL, 
	model_b VARCHAR NOT NULL, 
	output_a TEXT NOT NULL, 
	output_b TEXT NOT NULL, 
	prompt TEXT NOT NULL, 
	choice VARCHAR(4) NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(image_id) REFERENCES images (id)
);
CREATE TABLE reviews (
	id INTEGER NOT NULL, 
	image_id INTEGER NOT NULL, 
	annotator VARCHAR NOT NULL, 
	label VARCHAR NOT NULL, 
	previous_label VARCHAR, 
	note TEXT, 
	source VARCHAR NOT NULL, 
	model_snapshot_json TEXT, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(image_id) REFERENCES images (id)
);
INSERT INTO "reviews" VALUES(1,2,'import','Bengal',NULL,NULL,'import',NULL,'2026-12-02 00:42:45.930629');
INSERT INTO "reviews" VALUES(2,3,'import','Bengal',NULL,NULL,'import',NULL,'2026-12-02 00:42:45.947175');
INSERT INTO "reviews" VALUES(3,4,'import','Bengal',NULL,NULL,'import',NULL,'2026-12-02 00:42:45.958665');
INSERT INTO "reviews" VALUES(4,6,'import','Persian',NULL,NULL,'import',NULL,'2026-12-02 00:42:46.609493');
INSERT INTO "reviews" VALUES(5,7,'import','Persian',NULL,NULL,'import',NULL,'2026-12-02 00:42:46.624940');
INSERT INTO "reviews" VALUES(6,8,'import','Persian',NULL,NULL,'import',NULL,'2026-12-02 00:42:46.637915');
INSERT INTO "reviews" VALUES(7,9,'import','Siamese',NULL,NULL,'import',NULL,'2026-12-02 00:42:46.654413');
INSERT INTO "reviews" VALUES(8,10,'import','Siamese',NULL,NULL,'import',NULL,'2026-12-02 00:42:46.672341');
INSERT INTO "reviews" VALUES(9,11,'import','Siamese',NULL,NULL,'import',NULL,'2026-12-02 00:42:46.694363');
INSERT INTO "reviews" VALUES(10,2,'alice','Maine Coon','Bengal','ears look wrong','ui','{"stage1": [["Nebelung", 0.03332241624593735], ["Tonkinese", 0.028010457754135132], ["Tuxedo", 0.027561940252780914]], "vlm": {"Nebelung": 0.24733456034507678, "Tonkinese": 0.20489195485168626, "Tuxedo": 0.30534664511442466, "other": 0.2424268396888123}, "fused": {"label": "Tuxedo", "probability": 0.30877498838489525}, "model_versions": {"stage1": "cb7463c994ca-labelse425ae81", "vlm": "llava-tiny@d6af05217a-p1"}}','2026-12-02 00:43:30.138006');
INSERT INTO "reviews" VALUES(11,2,'bob','Bengal','Maine Coon',NULL,'ui','{"stage1": [["Nebelung", 0.03332241624593735], ["Tonkinese", 0.028010457754135132], ["Tuxedo", 0.027561940252780914]], "vlm": {"Nebelung": 0.24733456034507678, "Tonkinese": 0.20489195485168626, "Tuxedo": 0.30534664511442466, "other": 0.2424268396888123}, "fused": {"label": "Tuxedo", "probability": 0.30877498838489525}, "model_versions": {"stage1": "cb7463c994ca-labelse425ae81", "vlm": "llava-tiny@d6af05217a-p1"}}','2026-12-02 00:43:30.168995');
INSERT INTO "reviews" VALUES(12,6,'alice','Unsure','Persian',NULL,'ui','{"stage1": [["Calico", 0.03269895166158676], ["Abyssinian", 0.02877410501241684], ["Selkirk Rex", 0.02650371752679348]], "vlm": {"Calico": 0.0964215846818849, "Abyssinian": 0.2232182351359448, "Selkirk Rex": 0.2477820692718173, "other": 0.43257811091035286}, "fused": {"label": "Selkirk Rex", "probability": 0.271713704028342}, "model_versions": {"stage1": "cb7463c994ca-labelse425ae81", "vlm": "llava-tiny@d6af05217a-p1"}}','2026-12-02 00:43:30.189184');
INSERT INTO "reviews" VALUES(13,9,'carol','Not a cat','Siamese',NULL,'ui','{"stage1": [["Calico", 0.03328869491815567], ["Selkirk Rex", 0.02758960612118244], ["Abyssinian", 0.025181664153933525]], "vlm": {"Calico": 0.10229244521186166, "Selkirk Rex": 0.2856487231580447, "Abyssinian": 0.14278227925891077, "other": 0.46927655237118304}, "fused": {"label": "Selkirk Rex", "probability": 0.29751520937674647}, "model_versions": {"stage1": "cb7463c994ca-labelse425ae81", "vlm": "llava-tiny@d6af05217a-p1"}}','2026-12-02 00:43:30.209650');
CREATE TABLE split_assignments (
	sha256 VARCHAR(64) NOT NULL, 
	split VARCHAR(8) NOT NULL, 
	assigned_at DATETIME NOT NULL, 
	PRIMARY KEY (sha256)
);
INSERT INTO "split_assignments" VALUES('059916258a3ff48645daa656cace686a213c0580ded6c2d2925e8057725d57cc','train','2026-12-02 00:43:49.614825');
INSERT INTO "split_assignments" VALUES('59535633f7f381015f7578fefd5d1f1ed0abd80d7c1c881f061e894d185bc5d2','train','2026-12-02 00:43:49.614825');
INSERT INTO "split_assignments" VALUES('5cafdfe659a555ed672074b9b4c773ec553cdfef034415848a1585428e771c6e','train','2026-12-02 00:43:49.614825');
INSERT INTO "split_assignments" VALUES('7ca8784b6ab820b05f68eb7075677ae932d026064e554c0920e4ad67c6b70843','train','2026-12-02 00:43:49.614825');
INSERT INTO "split_assignments" VALUES('a2bd93a10fdee45148eb2fc565ae652b32a1dcd171ef1483662ada64e08109e1','train','2026-12-02 00:43:49.614825');
INSERT INTO "split_assignments" VALUES('b893d3926da99efc8bdb461ccab65b58a08bc446a40a60f21d899eef3dad0451','train','2026-12-02 00:43:49.614825');
INSERT INTO "split_assignments" VALUES('cbac8baf7f5ce858e60ca67189d09445f7425c10b8605df0804215438391cbd9','train','2026-12-02 00:43:49.614825');
CREATE TABLE training_runs (
	id INTEGER NOT NULL, 
	base_model VARCHAR NOT NULL, 
	status VARCHAR NOT NULL, 
	pid INTEGER, 
	run_dir VARCHAR NOT NULL, 
	adapter_id INTEGER, 
	error TEXT, 
	started_at DATETIME NOT NULL, 
	finished_at DATETIME, 
	PRIMARY KEY (id), 
	FOREIGN KEY(adapter_id) REFERENCES adapters (id)
);
CREATE UNIQUE INDEX ix_images_sha256 ON images (sha256);
CREATE INDEX ix_predictions_image_id ON predictions (image_id);
CREATE INDEX ix_predictions_kind ON predictions (kind);
CREATE INDEX ix_reviews_created_at ON reviews (created_at);
CREATE INDEX ix_reviews_image_id ON reviews (image_id);
CREATE INDEX ix_preferences_image_id ON preferences (image_id);
COMMIT;
